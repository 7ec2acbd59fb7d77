"""Failed sign-ins per address: blocked after MAX_FAILURES within the window, free again after it, and a
success forgets the address's failures."""

from __future__ import annotations

from gateway.console.throttle import MAX_ADDRESSES, SignInThrottle
from tests.doubles import FakeClock


def test_an_address_is_blocked_after_its_failures_until_the_window_passes():
    clock = FakeClock(1000.0)
    throttle = SignInThrottle(max_failures=3, window_s=60, clock=clock)
    for _ in range(2):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 60
    assert throttle.retry_after("10.0.0.2") == 0  # another address is not held back
    clock.now += 61
    assert throttle.retry_after("10.0.0.1") == 0


def test_a_success_forgets_the_failures():
    throttle = SignInThrottle(max_failures=2, window_s=60, clock=FakeClock())
    throttle.failed("a")
    throttle.succeeded("a")
    throttle.failed("a")
    assert throttle.retry_after("a") == 0


def test_the_map_is_bounded():
    throttle = SignInThrottle(clock=FakeClock())
    for index in range(MAX_ADDRESSES + 50):
        throttle.failed(f"addr-{index}")
    assert len(throttle._failures) <= MAX_ADDRESSES
