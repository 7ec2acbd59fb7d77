"""OpenAI's Videos API create and remix → the Seedance body the task flow forwards (SPEC §11).

Pure: the routes parse JSON or multipart, hand the fields here, and pass the result on to the task flow,
which never learns which shape a request came in. §4's validation still runs on the body built here.

Decisions where SPEC §11 is silent:

- A dated snapshot name (`sora-2-2025-10-06`) is kept as the client sent it, as any alias is; the configured
  aliases may name a snapshot themselves, which then wins over its family's mapping.
- `null` counts as absent; a field the mapping does not know is 400 `unsupported_parameter`
  (the SDK sends `extra_body` keys as form fields; dropping them silently would mislead the app).
- `seconds` is a JSON integer or a string of ASCII digits; it is echoed normalised ("08" → "8").
- A multipart text field `input_reference[image_url]` is the form spelling of the JSON object.
- The idempotency fingerprint keeps field values as sent (JSON 8 and form "8" differ, as the bodies do)
  and never matches a TokenHub-shape body.
- An image's data: URL, uploaded or in a JSON body, is a `Passage` in the fields and the body (openai/upload.py):
  §4 validates its start, and `Translation.json()`, what is sent, and the fingerprint write it whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.errors import UnsupportedParameter, ValidationError
from gateway.openai.upload import Image, Passage, Upload, dumps, sha256_json

DEFAULT_ALIASES = {"sora-2": "doubao-seedance-2.0-fast", "sora-2-pro": "doubao-seedance-2.0"}
# The dated snapshots the openai SDKs list (its VideoModel), each mapped like its family unless configured itself.
SNAPSHOTS = {"sora-2-2025-10-06": "sora-2", "sora-2-2025-12-08": "sora-2", "sora-2-pro-2025-10-06": "sora-2-pro"}
DEFAULT_MODEL = "sora-2"
DEFAULT_SECONDS = "4"
DEFAULT_SIZE = "720x1280"
MIN_SECONDS, MAX_SECONDS = 4, 15
MIN_REFERENCE_S = 2
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_NAME_CHARS = 64
RATIOS = {"16:9": 16 / 9, "4:3": 4 / 3, "1:1": 1.0, "3:4": 3 / 4, "9:16": 9 / 16, "21:9": 21 / 9}
INPUT = "input_reference"
CREATE_FIELDS = frozenset({"prompt", "model", "seconds", "size", INPUT})
REMIX_FIELDS = frozenset({"prompt", "model", "seconds", "size"})
# Where §4's validation of the mapped body points, in the client's own field names.
CLIENT_PARAMS = {
    "model": "model",
    "prompt": "prompt",
    "duration": "seconds",
    "resolution": "size",
    "aspect_ratio": "size",
    "content": INPUT,
    "video_durations": INPUT,
}

_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
_DIGITS = re.compile(r"[0-9]{1,3}")
_FORM_NESTED = re.compile(r"input_reference\[([a-z_]+)\]")


@dataclass(frozen=True, slots=True)
class VideoFacts:
    """What the Video object shows that Seedance's task does not keep: the client's own names."""

    model: str
    seconds: str
    size: str
    prompt: str | None = None
    remixed_from: str | None = None


class Translation(NamedTuple):
    body: dict[str, Any]
    facts: VideoFacts

    def json(self) -> bytes:
        """The body to send TokenHub, an image's data: URL in it whole."""
        return dumps(self.body)


def to_seedance(
    fields: Mapping[str, Any], aliases: Mapping[str, str], models: Collection[str], upload: Upload | None = None
) -> Translation:
    """A create's fields (a JSON object, or form fields plus the `input_reference` file) → the Seedance body."""
    fields = _present(fields, CREATE_FIELDS)
    client_model, model = _model(fields.get("model"), aliases, models)
    prompt, seconds = _prompt(fields.get("prompt")), _seconds(fields.get("seconds"))
    size = _size_text(fields.get("size"))
    body = _body(model, prompt, seconds, size)
    url = _image_url(upload, fields.get(INPUT)) if upload is not None else _reference_url(fields.get(INPUT))
    if url is not None:
        body["content"] = [{"type": "image_url", "image_url": {"url": url}, "role": "first_frame"}]
    return Translation(body, VideoFacts(client_model, seconds, size, prompt))


def remix_body(
    source_id: str,
    source: VideoFacts,
    source_url: str,
    fields: Mapping[str, Any],
    aliases: Mapping[str, str],
    models: Collection[str],
    source_seconds: float | None = None,
) -> Translation:
    """A remix: the source's output as the reference video, its model, size and seconds unless given.

    `source_seconds` is the source's real output length when TokenHub reported one (the reservation is then
    exact); its requested seconds stand in when that figure is absent or outside Seedance's 2–15 s."""
    fields = _present(fields, REMIX_FIELDS)
    client_model, model = _model(fields.get("model", source.model), aliases, models)
    prompt, seconds = _prompt(fields.get("prompt")), _seconds(fields.get("seconds", source.seconds))
    size = _size_text(fields.get("size", source.size))
    body = _body(model, prompt, seconds, size)
    body["content"] = [{"type": "video_url", "video_url": {"url": source_url}, "role": "reference_video"}]
    real = source_seconds is not None and MIN_REFERENCE_S <= source_seconds <= MAX_SECONDS
    body["video_durations"] = [source_seconds if real else int(source.seconds)]
    return Translation(body, VideoFacts(client_model, seconds, size, prompt, source_id))


def form_fields(parts: Iterable[tuple[str, str | Upload]]) -> tuple[dict[str, Any], Upload | None]:
    """Multipart parts in order → (text fields, the `input_reference` file), refusing a field given twice."""
    fields: dict[str, Any] = {}
    nested: dict[str, str] = {}
    upload: Upload | None = None
    seen: set[str] = set()
    for name, value in parts:
        if name in seen:
            raise ValidationError(f"{_bounded(name)} is given more than once.", param=_bounded(name))
        seen.add(name)
        if isinstance(value, Upload):
            if name != INPUT:
                raise ValidationError(f"{_bounded(name)} must be a text field, not a file.", param=_bounded(name))
            upload = value
        elif match := _FORM_NESTED.fullmatch(name):
            nested[match.group(1)] = value
        else:
            fields[name] = value
    if nested:
        if INPUT in seen:
            raise ValidationError(f"{INPUT} is given more than once.", param=INPUT)
        fields[INPUT] = nested
    return fields, upload


def fingerprint(fields: Mapping[str, Any], upload: Upload | None = None, *, remix_of: str | None = None) -> str:
    """The idempotency "same body" of a create or remix: its fields, a file by its SHA-256 (not its name,
    declared type or multipart boundary)."""
    canon: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    if upload is not None:
        canon[INPUT] = {"sha256": upload.sha256()}
    shape = "openai.videos.remix" if remix_of is not None else "openai.videos"
    doc = {"shape": shape, "remix_of": remix_of, "fields": canon}
    return sha256_json(doc, sort_keys=True)


def client_param(param: str | None) -> str | None:
    """§4's `param` for the mapped body → the field the client sent (`duration` → `seconds`, ...)."""
    if param is None:
        return None
    return CLIENT_PARAMS.get(re.split(r"[\[.]", param, maxsplit=1)[0], param)


def seedance_size(size: str) -> tuple[str, str]:
    """A valid "WxH" → (Seedance resolution, nearest Seedance aspect ratio by log distance)."""
    width, height = map(int, size.split("x"))
    resolution = "480p" if min(width, height) <= 480 else "720p"
    ratio = math.log(width / height)
    return resolution, min(RATIOS, key=lambda name: abs(math.log(RATIOS[name]) - ratio))


def sniff_image(data: bytes) -> str | None:
    """The media type of a JPEG, PNG or WebP image by its first bytes; None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _body(model: str, prompt: str, seconds: str, size: str) -> dict[str, Any]:
    resolution, ratio = seedance_size(size)
    return {"model": model, "prompt": prompt, "duration": int(seconds), "resolution": resolution, "aspect_ratio": ratio}


def _present(fields: Mapping[str, Any], known: frozenset[str]) -> dict[str, Any]:
    present = {k: v for k, v in fields.items() if v is not None}
    for name in sorted(present.keys() - known):
        name = _bounded(name)
        raise UnsupportedParameter(
            f"{name} has no equivalent in Seedance through this gateway; "
            f"the fields taken are {', '.join(sorted(known))}.",
            param=name,
        )
    return present


def _bounded(name: str) -> str:
    return name[:MAX_NAME_CHARS]  # a client's field name, echoed in the error


def model_names(aliases: Mapping[str, str]) -> dict[str, str]:
    """Every client-facing model name → the name it stands for: the aliases (configured over the defaults),
    and each dated snapshot of a family, mapped like the family unless configured itself."""
    names = {**DEFAULT_ALIASES, **aliases}
    snapshots = {snapshot: names[family] for snapshot, family in SNAPSHOTS.items() if family in names}
    return {**snapshots, **names}


def _model(value: Any, aliases: Mapping[str, str], models: Collection[str]) -> tuple[str, str]:
    """(the model name the client gave, or the default; the Seedance model it names)."""
    value = DEFAULT_MODEL if value is None else value
    names = model_names(aliases)
    if not isinstance(value, str) or (target := names.get(value, value)) not in models:
        offered = sorted({*(a for a, m in names.items() if m in models), *models})
        raise ValidationError(f"model must be one of {', '.join(offered)}.", param="model")
    return value, target


def _prompt(value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError("prompt is required: a non-empty string.", param="prompt")
    return value


def _seconds(value: Any) -> str:
    value = DEFAULT_SECONDS if value is None else value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SECONDS <= value <= MAX_SECONDS:
        raise ValidationError(
            f"seconds must be a whole number of seconds from {MIN_SECONDS} to {MAX_SECONDS} "
            f'(a string such as "8", or an integer).',
            param="seconds",
        )
    return str(value)


def _size_text(value: Any) -> str:
    value = DEFAULT_SIZE if value is None else value
    if not isinstance(value, str) or not _SIZE.fullmatch(value):
        raise ValidationError('size must be "WIDTHxHEIGHT" in pixels, such as "1280x720".', param="size")
    return value


def _reference_url(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict) and value.keys() == {"image_url"}:
        if not isinstance(value["image_url"], str) or not value["image_url"]:
            raise ValidationError(f"{INPUT}.image_url must be a URL string.", param=INPUT)
        return value["image_url"]
    what = (
        "a file_id (the gateway keeps no files)"
        if isinstance(value, dict) and "file_id" in value
        else 'anything but an uploaded image or {"image_url": ...}'
    )
    raise UnsupportedParameter(f"{INPUT} cannot be {what}.", param=INPUT)


def _image_url(upload: Upload, value: Any) -> Passage:
    """The uploaded file's data: URL, its type told by its first bytes (the file is never read whole here)."""
    if value is not None:
        raise ValidationError(f"{INPUT} is given more than once.", param=INPUT)
    media_type = sniff_image(upload.head)
    if media_type is None:
        what = "a video" if _is_video(upload.head) else "this kind of file"
        raise UnsupportedParameter(
            f"{INPUT} must be a JPEG, PNG or WebP image; Seedance takes no first frame from {what}.", param=INPUT
        )
    if upload.size > MAX_IMAGE_BYTES:
        raise ValidationError(f"{INPUT} must be at most {MAX_IMAGE_BYTES // 1024 // 1024} MiB.", param=INPUT)
    return Passage(Image(media_type, upload))


def _is_video(data: bytes) -> bool:
    # ISO BMFF (MP4, MOV) carries "ftyp" at offset 4, as HEIC/AVIF images do; Matroska/WebM has EBML magic.
    brand = data[8:12]
    return (data[4:8] == b"ftyp" and brand not in (b"heic", b"heix", b"avif", b"avis", b"mif1", b"msf1")) or data[
        :4
    ] == b"\x1a\x45\xdf\xa3"
