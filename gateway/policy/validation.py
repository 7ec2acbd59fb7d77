"""The body of POST /videos/generations → a validated VideoRequest, or a ValidationError naming the field.

Decisions where SPEC §4 is silent:

- `null` counts as absent for every optional field, and for a content item's `role`.
- `duration` must be a JSON integer: 5.0 is a float and is rejected.
- A media item in `content` without a role takes the reference role of its type.
- `video_durations` and `input_video_duration` together are accepted only when they agree
  (the sum equals the total); otherwise the request is ambiguous and rejected.
- An empty `video_durations` list counts as absent.
- The 2,048-character limit applies to http(s) and asset URLs; data: URIs are bounded by the body limit.
- Role-count errors name the collection where the limit was crossed (`content`, `video_urls`, ...);
  frame errors name the frame's role (`content[2].role`).
- Counts come before per-item checks: media items are gathered with O(1) checks each and the walk stops at
  the first one past a limit, so URL regexes and data: URI checks run on at most 12 items, whatever the
  body holds. `text` items have no count limit of their own: they are walked, with O(1) checks each.
- `input_video_duration` counts each reference video at least 2 s (Seedance's minimum), as
  `video_durations` does item by item.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from itertools import chain
from typing import Any, NamedTuple

from gateway.errors import ValidationError
from gateway.policy.pricing import MAX_INPUT_VIDEO_S

MAX_PROMPT_CHARS = 5_000
MAX_URL_CHARS = 2_048
MIN_DURATION_S = 4
MAX_DURATION_S = 15
DEFAULT_DURATION_S = 5
MIN_VIDEO_S, MAX_VIDEO_S = 2, 15
MAX_MEDIA_ITEMS = 12
DEFAULT_RESOLUTION = "720p"
ASPECT_RATIOS = ("adaptive", "16:9", "4:3", "1:1", "3:4", "9:16", "21:9")
MEDIA_TYPES = {"image_url": "image", "video_url": "video", "audio_url": "audio"}
FLAT_FIELDS = (
    ("image_url", "image_urls", "image"),
    ("video_url", "video_urls", "video"),
    ("audio_url", "audio_urls", "audio"),
)
ROLE_KIND = {
    "first_frame": "image",
    "last_frame": "image",
    "reference_image": "image",
    "reference_video": "video",
    "reference_audio": "audio",
}
ROLE_LIMITS = {"first_frame": 1, "last_frame": 1, "reference_image": 9, "reference_video": 3, "reference_audio": 3}
FRAMES = ("first_frame", "last_frame")
URL_FORMS = {
    "image": "https://, http://, asset://<id> or data:image/<subtype>;base64,<data>",
    "video": "https://, http:// or asset://<id>",
    "audio": "https://, http://, asset://<id> or data:audio/<subtype>;base64,<data>",
}

_HTTP_URL = re.compile(r"https?://(?:[^\s/?#@]*@)?(?:\[[0-9a-f:.]+\]|[^\s/?#@:\[\]]+)(?::\d*)?(?:[/?#]\S*)?", re.I)
_ASSET_URL = re.compile(r"asset://\S+", re.I)
_DATA_PREFIX = re.compile(r"data:([a-z]+)/[a-z0-9.+-]+;base64,", re.I)
# Every field that can hold media or input-video seconds: a body with none of them (the common text-to-video
# create) has no roles to count and no input seconds, so validate() skips that walk.
_MEDIA_FIELDS = frozenset(
    (
        "content",
        "video_durations",
        "input_video_duration",
        *(field for one, many, _ in FLAT_FIELDS for field in (one, many)),
    )
)
_NO_SECONDS = Decimal(0)


class VideoRequest(NamedTuple):  # not a frozen dataclass: its __init__ costs ~7 times as much, once per create
    model: str
    resolution: str
    duration_s: int
    input_s: Decimal
    input_estimated: bool
    reference_videos: int
    aspect_ratio: str = "adaptive"


class _Media(NamedTuple):
    role: str
    param: str  # where a role error points: "content[2].role", or the flat field's name
    collection: str  # where a count error points: "content", or the flat field's name
    url: Any
    url_param: str  # where a URL error points: "content[2].image_url.url", "image_urls[1]"


def validate(body: object, pricing: Mapping[str, Mapping[str, int]]) -> VideoRequest:
    """Check `body` against SPEC §4 and resolve the defaults; raise ValidationError for the first problem."""
    if not isinstance(body, dict):
        raise ValidationError("Expected a JSON object as the request body.", param=None)
    model = _choice("model", body.get("model"), pricing, None)
    _prompt(body.get("prompt"))
    duration = _duration(body.get("duration"))
    resolution = _choice("resolution", body.get("resolution"), pricing[model], DEFAULT_RESOLUTION)
    ratio = _choice("aspect_ratio", body.get("aspect_ratio"), ASPECT_RATIOS, "adaptive")
    for name in ("generate_audio", "watermark"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise ValidationError(f"{name} must be true or false.", param=name)
    if body.keys().isdisjoint(_MEDIA_FIELDS):
        return VideoRequest(model, resolution, duration, _NO_SECONDS, False, 0, ratio)
    media, counts = _count_roles(chain(_flat_media(body), _content_media(body.get("content"))))
    for item in media:
        _check_url(item.url, ROLE_KIND[item.role], item.url_param)
    _check_modes(media, counts)
    videos = counts["reference_video"]
    input_s, estimated = _input_seconds(body, videos)
    return VideoRequest(model, resolution, duration, input_s, estimated, videos, ratio)


def _prompt(value: Any) -> None:
    if not isinstance(value, str) or not value or value.isspace():
        raise ValidationError("prompt is required: a non-empty string.", param="prompt")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValidationError(f"prompt must be at most {MAX_PROMPT_CHARS:,} characters.", param="prompt")


def _duration(value: Any) -> int:
    if value is None:
        return DEFAULT_DURATION_S
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_DURATION_S <= value <= MAX_DURATION_S:
        raise ValidationError(
            f"duration must be an integer number of seconds from {MIN_DURATION_S} to {MAX_DURATION_S}.",
            param="duration",
        )
    return value


def _choice(name: str, value: Any, allowed: Iterable[str], default: str | None) -> str:
    value = default if value is None else value
    if not isinstance(value, str) or value not in allowed:
        raise ValidationError(f"{name} must be one of {', '.join(allowed)}.", param=name)
    return value


def _array(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(f"{name} must be an array.", param=name)
    return value


def _flat_media(body: dict[str, Any]) -> Iterator[_Media]:
    for one, many, kind in FLAT_FIELDS:
        role = f"reference_{kind}"
        if (url := body.get(one)) is not None:
            yield _Media(role, one, one, url, one)
        for i, url in enumerate(_array(body.get(many), many)):
            yield _Media(role, many, many, url, f"{many}[{i}]")


def _content_media(content: Any) -> Iterator[_Media]:
    for i, item in enumerate(_array(content, "content")):
        if _is_text(item):
            continue
        where = f"content[{i}]"
        if not isinstance(item, dict):
            raise ValidationError("content items must be objects.", param=where)
        kind_name = item.get("type")
        if kind_name == "text":
            _bad_text_item(item, where)
        elif isinstance(kind_name, str) and kind_name in MEDIA_TYPES:
            yield _media_item(item, kind_name, where)
        else:
            raise ValidationError("type must be one of image_url, video_url, audio_url, text.", param=f"{where}.type")


def _is_text(item: Any) -> bool:
    """A well-formed text item: checked first, as text items are the ones without a count limit."""
    return (
        isinstance(item, dict)
        and item.get("type") == "text"
        and isinstance(item.get("text"), str)
        and item.get("role") is None
    )


def _bad_text_item(item: dict[str, Any], where: str) -> None:
    if not isinstance(item.get("text"), str):
        raise ValidationError("a text item needs a string text.", param=f"{where}.text")
    raise ValidationError("a text item carries no role.", param=f"{where}.role")


def _media_item(item: dict[str, Any], kind_name: str, where: str) -> _Media:
    kind = MEDIA_TYPES[kind_name]
    media = item.get(kind_name)
    if not isinstance(media, dict):
        raise ValidationError(f'{kind_name} must be an object {{"url": ...}}.', param=f"{where}.{kind_name}")
    url, url_param = media.get("url"), f"{where}.{kind_name}.url"
    role = item.get("role")
    if role is None:
        return _Media(f"reference_{kind}", f"{where}.role", "content", url, url_param)
    if not isinstance(role, str) or role not in ROLE_KIND:
        raise ValidationError(f"role must be one of {', '.join(ROLE_KIND)}.", param=f"{where}.role")
    if ROLE_KIND[role] != kind:
        raise ValidationError(
            f"role {role} goes with a {ROLE_KIND[role]}_url item, not {kind_name}.", param=f"{where}.role"
        )
    return _Media(role, f"{where}.role", "content", url, url_param)


def _check_url(url: Any, kind: str, param: str) -> None:
    if not isinstance(url, str):
        raise ValidationError(f"expected a URL string: {URL_FORMS[kind]}.", param=param)
    if url[:5].lower() == "data:":
        _check_data_uri(url, kind, param)
    elif len(url) > MAX_URL_CHARS:
        raise ValidationError(f"URLs must be at most {MAX_URL_CHARS:,} characters.", param=param)
    elif not (_HTTP_URL.fullmatch(url) or _ASSET_URL.fullmatch(url)):
        raise ValidationError(f"unsupported URL: expected {URL_FORMS[kind]}.", param=param)


def _check_data_uri(url: str, kind: str, param: str) -> None:
    if kind == "video":
        raise ValidationError(f"videos take no data: URI; expected {URL_FORMS[kind]}.", param=param)
    prefix = _DATA_PREFIX.match(url)
    if prefix is None or prefix.group(1).lower() != kind or prefix.end() == len(url):
        raise ValidationError(f"expected a base64 data URI data:{kind}/<subtype>;base64,<data>.", param=param)


def _count_roles(found: Iterator[_Media]) -> tuple[list[_Media], Counter[str]]:
    """Take media items until one crosses a limit: the walk never goes past the 13th item."""
    media: list[_Media] = []
    counts: Counter[str] = Counter()
    for total, item in enumerate(found, 1):
        media.append(item)
        counts[item.role] += 1
        limit = ROLE_LIMITS[item.role]
        if counts[item.role] > limit:
            param = item.param if item.role in FRAMES else item.collection
            raise ValidationError(
                f"at most {limit} {item.role} item(s) allowed, counting content and the flat *_url(s) fields together.",
                param=param,
            )
        if total > MAX_MEDIA_ITEMS:
            raise ValidationError(f"at most {MAX_MEDIA_ITEMS} media items in all.", param=item.collection)
    return media, counts


def _check_modes(media: list[_Media], counts: Counter[str]) -> None:
    frames = [item for item in media if item.role in FRAMES]
    if counts["last_frame"] and not counts["first_frame"]:
        raise ValidationError("a last_frame needs a first_frame image.", param=frames[0].param)
    if frames and len(frames) < len(media):
        raise ValidationError(
            "first_frame/last_frame images cannot be mixed with reference images, videos or audio.",
            param=frames[0].param,
        )
    if counts["reference_audio"] and not (counts["reference_image"] or counts["reference_video"]):
        audio = next(item for item in media if item.role == "reference_audio")
        raise ValidationError(
            "reference audio needs at least one reference image or video beside it.", param=audio.collection
        )


def _input_seconds(body: dict[str, Any], videos: int) -> tuple[Decimal, bool]:
    listed = _video_durations(body.get("video_durations"), videos)
    total = _input_video_duration(body.get("input_video_duration"), videos)
    if listed is not None and total is not None and listed != total:
        raise ValidationError(
            f"input_video_duration disagrees with the sum of video_durations ({listed}); send one of them.",
            param="input_video_duration",
        )
    given = listed if listed is not None else total
    if given is not None:
        return given, False
    if videos:
        return Decimal(MAX_INPUT_VIDEO_S), True
    return Decimal(0), False


def _video_durations(value: Any, videos: int) -> Decimal | None:
    items = _array(value, "video_durations")
    if not items:
        return None
    if not videos:
        raise ValidationError("video_durations needs reference videos to describe.", param="video_durations")
    if len(items) != videos:
        raise ValidationError(
            f"video_durations needs exactly one entry per reference video ({videos}, "
            "counting video_url(s) and content reference_video items).",
            param="video_durations",
        )
    for i, seconds in enumerate(items):
        if not _is_number(seconds) or not MIN_VIDEO_S <= seconds <= MAX_VIDEO_S:
            raise ValidationError(
                f"each video duration must be a number from {MIN_VIDEO_S} to {MAX_VIDEO_S} seconds.",
                param=f"video_durations[{i}]",
            )
    listed = sum((Decimal(str(seconds)) for seconds in items), Decimal(0))
    if listed > MAX_INPUT_VIDEO_S:
        raise ValidationError(
            f"reference videos may last at most {MAX_INPUT_VIDEO_S} s together.", param="video_durations"
        )
    return listed


def _input_video_duration(value: Any, videos: int) -> Decimal | None:
    if value is None:
        return None
    if not _is_number(value) or not 0 < value <= MAX_INPUT_VIDEO_S:
        raise ValidationError(
            f"input_video_duration must be a number of seconds above 0 and at most {MAX_INPUT_VIDEO_S}.",
            param="input_video_duration",
        )
    if not videos:
        raise ValidationError("input_video_duration needs at least one reference video.", param="input_video_duration")
    if value < MIN_VIDEO_S * videos:
        raise ValidationError(
            f"input_video_duration must be at least {MIN_VIDEO_S} s per reference video "
            f"({videos} given: at least {MIN_VIDEO_S * videos} s).",
            param="input_video_duration",
        )
    return Decimal(str(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
