from decimal import Decimal

import pytest

from gateway.money import cost_micros, micros_to_usd, seconds_to_ms, usd_to_micros
from gateway.policy.pricing import actual, estimate
from tests.doubles import FAST, MODEL, PRICING


def test_default_prices_in_micros():
    assert PRICING == {MODEL: {"720p": 200_000, "480p": 120_000}, FAST: {"720p": 160_000, "480p": 100_000}}


@pytest.mark.parametrize(
    "model, res, input_s, duration, expected",
    [
        (MODEL, "720p", Decimal(0), 5, (5_000, 1_000_000)),  # SPEC: 5 s at $0.20 = $1.00
        (MODEL, "720p", Decimal(5), 10, (15_000, 3_000_000)),  # SPEC: (5 + 10) × 0.20 = $3.00
        (MODEL, "480p", Decimal(0), 5, (5_000, 600_000)),
        (FAST, "720p", Decimal(0), 15, (15_000, 2_400_000)),
        (FAST, "480p", Decimal(0), 5, (5_000, 500_000)),
        (FAST, "480p", Decimal("2.5"), 4, (6_500, 650_000)),
        (MODEL, "720p", Decimal(15), 15, (30_000, 6_000_000)),  # reference videos without durations
        (MODEL, "720p", Decimal("0.0000025"), 4, (4_000, 800_001)),  # 800 000.5 rounds half up
    ],
)
def test_estimate(model, res, input_s, duration, expected):
    assert estimate(PRICING, model, res, input_s, duration) == expected


@pytest.mark.parametrize(
    "model, res, input_s, status, video_duration, expected",
    [
        (MODEL, "720p", Decimal(0), "succeeded", 5, (5_000, 1_000_000)),
        (MODEL, "720p", Decimal(0), "succeeded", 5.0, (5_000, 1_000_000)),
        (MODEL, "720p", Decimal(0), "succeeded", Decimal("5"), (5_000, 1_000_000)),
        (MODEL, "720p", Decimal(5), "succeeded", 10, (15_000, 3_000_000)),
        (FAST, "480p", Decimal(0), "succeeded", 5, (5_000, 500_000)),
        (FAST, "480p", Decimal(0), "succeeded", 4.2, (4_200, 420_000)),
        (MODEL, "720p", Decimal(0), "succeeded", 5.0000025, (5_000, 1_000_001)),  # 1 000 000.5 → up
        (MODEL, "720p", Decimal(0), "succeeded", 5.0000024, (5_000, 1_000_000)),  # 1 000 000.48 → down
        (FAST, "480p", Decimal(0), "succeeded", 0.000005, (0, 1)),  # 0.5 micro → 1
        (MODEL, "720p", Decimal(0), "succeeded", 5.0005, (5_001, 1_000_100)),  # 5000.5 ms → 5001
        (MODEL, "720p", Decimal(0), "succeeded", 0.1 + 0.2, (300, 60_000)),  # float noise does not leak
        (MODEL, "720p", Decimal(0), "failed", 5, (0, 0)),
        (MODEL, "720p", Decimal(5), "failed", None, (0, 0)),
        (MODEL, "720p", Decimal(5), "cancelled", 10, (0, 0)),
        (FAST, "480p", Decimal(0), "expired", 5, (0, 0)),
    ],
)
def test_actual(model, res, input_s, status, video_duration, expected):
    assert actual(PRICING, model, res, input_s, status, video_duration) == expected


@pytest.mark.parametrize(
    "seconds, price, expected",
    [
        (Decimal("0.5"), 1, 1),  # half up, not half to even
        (Decimal("1.5"), 1, 2),
        (Decimal("2.5"), 1, 3),
        (Decimal("2.5"), 3, 8),
        (Decimal("0.4999999"), 1, 0),
        (7, 200_000, 1_400_000),
        (Decimal("3.3"), 120_000, 396_000),
    ],
)
def test_cost_micros_rounds_half_up(seconds, price, expected):
    assert cost_micros(seconds, price) == expected


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (5, 5_000),
        (Decimal("5.0004"), 5_000),
        (Decimal("5.0005"), 5_001),
        (4.2, 4_200),
        (0.1 + 0.2, 300),
    ],
)
def test_seconds_to_ms(seconds, expected):
    assert seconds_to_ms(seconds) == expected


def test_custom_pricing_table():
    pricing = {**PRICING, "seedance-lite": {"1080p": usd_to_micros(0.3)}}
    assert estimate(pricing, "seedance-lite", "1080p", Decimal(0), 10) == (10_000, 3_000_000)
    assert actual(pricing, "seedance-lite", "1080p", Decimal(2), "succeeded", 8) == (10_000, 3_000_000)


def test_many_small_costs_add_up_exactly():
    one = actual(PRICING, FAST, "480p", Decimal(0), "succeeded", 0.1)[1]
    assert one == 10_000 and sum([one] * 10) == actual(PRICING, FAST, "480p", Decimal(0), "succeeded", 1)[1]


@pytest.mark.parametrize(
    "usd, micros",
    [
        (0.1 + 0.2, 300_000),
        (1.1 * 3, 3_300_000),
        (0.07, 70_000),
        (0.2, 200_000),
        (0.12, 120_000),
        (0.16, 160_000),
        (500, 500_000_000),
        (500.0, 500_000_000),
        (Decimal("0.1"), 100_000),
        (0.000001, 1),
        (0.0000005, 1),  # half up
        (0.0000004, 0),
        (1e-7, 0),
        (0, 0),
        (123456.789012, 123_456_789_012),
    ],
)
def test_usd_to_micros_is_exact(usd, micros):
    assert usd_to_micros(usd) == micros
    assert isinstance(usd_to_micros(usd), int)


def test_micros_add_up_where_floats_drift():
    assert sum(usd_to_micros(0.1) for _ in range(10)) == usd_to_micros(1.0) == 1_000_000


@pytest.mark.parametrize(
    "micros, usd", [(1_000_000, 1.0), (200_000, 0.2), (3_000_000, 3.0), (1, 0.000001), (123_456_789, 123.456789)]
)
def test_micros_to_usd(micros, usd):
    assert micros_to_usd(micros) == usd
