"""validate()'s shortcut for bodies without media fields agrees with its full walk.

A media field holding null counts as absent, so the same body with one such field added takes the full walk
and must give the same request or the same error.
"""

import random

import pytest

from gateway.errors import ValidationError
from gateway.policy.validation import _MEDIA_FIELDS, validate
from tests.doubles import FAST, MODEL, PRICING

# field → (accepted values, refused values)
VALUES = {
    "model": ([MODEL, FAST], [None, "gpt-4", ["x"], 5]),
    "prompt": (["a cat surfing", "x" * 5000], ["", " \n", "x" * 5001, None, 5]),
    "duration": ([4, 5, 15, None], [3, 16, 5.0, True, "5"]),
    "resolution": (["480p", "720p", None], ["1080p", 720]),
    "aspect_ratio": (["adaptive", "16:9", "21:9", None], ["2:1", ["16:9"]]),
    "generate_audio": ([True, False, None], [1, "yes"]),
    "watermark": ([True, False, None], [0]),
    "seed": ([42, "x", None], []),
}


def outcome(payload):
    try:
        return "accepted", validate(payload, PRICING)
    except ValidationError as exc:
        return "refused", type(exc), exc.message, exc.param, exc.code


def bodies(seed, count):
    rng = random.Random(seed)
    for _ in range(count):
        yield {
            name: rng.choice(good if rng.random() < 0.8 or not bad else bad)
            for name, (good, bad) in VALUES.items()
            if rng.random() < 0.9
        }


@pytest.mark.parametrize("forcing", sorted(_MEDIA_FIELDS))
def test_shortcut_agrees_with_the_full_walk(forcing):
    cases = list(bodies(seed=20260, count=3000))
    assert sum(outcome(b)[0] == "accepted" for b in cases) > 300  # many bodies reach the shortcut
    for payload in cases:
        assert outcome(payload) == outcome({**payload, forcing: None}), payload


def test_a_media_field_alone_takes_the_full_walk():
    assert outcome({"model": MODEL, "prompt": "x", "video_durations": [5]})[3] == "video_durations"
