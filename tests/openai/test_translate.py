import base64
import typing

import httpx2
import openai
import orjson
import pytest
from openai.types import VideoModel
from starlette.datastructures import UploadFile
from starlette.requests import Request

from gateway.errors import UnsupportedParameter, ValidationError
from gateway.openai.translate import (
    DEFAULT_ALIASES,
    MAX_IMAGE_BYTES,
    SNAPSHOTS,
    Upload,
    VideoFacts,
    client_param,
    fingerprint,
    form_fields,
    remix_body,
    seedance_size,
    sniff_image,
    to_seedance,
)
from gateway.openai.upload import Passage, Span
from gateway.policy.validation import validate
from tests.doubles import PRICING

FAST, PRO = "doubao-seedance-2.0-fast", "doubao-seedance-2.0"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 17
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 20
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 20
GIF = b"GIF89a" + b"\x00" * 20
MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  "
WEBM = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01"
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"


def create(aliases=None, upload=None, **fields):
    return to_seedance({"prompt": "a cat", **fields}, aliases or {}, PRICING, upload)


def rejected(exc_type, param, fn, *args, **kw):
    with pytest.raises(exc_type) as info:
        fn(*args, **kw)
    assert (info.value.param, info.type) == (param, exc_type)
    return info.value


SIZES = [
    ("720x1280", "720p", "9:16"),
    ("1280x720", "720p", "16:9"),
    ("1024x1792", "720p", "9:16"),
    ("1792x1024", "720p", "16:9"),
    ("1920x1080", "720p", "16:9"),
    ("720x720", "720p", "1:1"),
    ("960x720", "720p", "4:3"),
    ("720x960", "720p", "3:4"),
    ("1680x720", "720p", "21:9"),
    ("2560x1080", "720p", "21:9"),
    ("854x480", "480p", "16:9"),
    ("480x854", "480p", "9:16"),
    ("480x480", "480p", "1:1"),
    ("640x480", "480p", "4:3"),
    ("481x481", "720p", "1:1"),
    ("1x1", "480p", "1:1"),
    ("100x10000", "480p", "9:16"),
    ("10000x100", "480p", "21:9"),
    # either side of the log-midpoints: 1:1|4:3 at 1.1547, 16:9|21:9 at 2.0367
    ("1150x1000", "720p", "1:1"),
    ("1160x1000", "720p", "4:3"),
    ("2030x1000", "720p", "16:9"),
    ("2040x1000", "720p", "21:9"),
]


@pytest.mark.parametrize(("size", "resolution", "ratio"), SIZES)
def test_size_maps_to_resolution_and_nearest_ratio(size, resolution, ratio):
    assert seedance_size(size) == (resolution, ratio)
    t = create(size=size)
    assert (t.body["resolution"], t.body["aspect_ratio"], t.facts.size) == (resolution, ratio, size)


@pytest.mark.parametrize(
    "size",
    [
        "1280*720",
        "1280x",
        "x720",
        "0x720",
        "1280x0",
        "-1x5",
        " 1280x720",
        "1280X720",
        "1280x720 ",
        "123456x1",
        "",
        "1280.0x720",
        1280,
        ["1280x720"],
    ],
)
def test_size_not_wxh_is_invalid(size):
    assert rejected(ValidationError, "size", create, size=size).code == "invalid_parameter"


SECONDS = [
    (None, "4"),
    ("4", "4"),
    (4, "4"),
    ("8", "8"),
    ("12", "12"),
    (12, "12"),
    ("15", "15"),
    (15, "15"),
    ("08", "8"),
    ("5", "5"),
]


@pytest.mark.parametrize(("seconds", "shown"), SECONDS)
def test_seconds_string_or_integer(seconds, shown):
    t = create(seconds=seconds)
    assert (t.body["duration"], t.facts.seconds) == (int(shown), shown)


@pytest.mark.parametrize("seconds", ["3", "16", 3, 16, 0, 8.0, "8.0", "eight", True, "", " 8", "٨", "-8", "1e1"])
def test_seconds_out_of_range_or_not_whole_is_invalid(seconds):
    assert rejected(ValidationError, "seconds", create, seconds=seconds).code == "invalid_parameter"


MODELS = [
    ({}, None, "sora-2", FAST),
    ({}, "sora-2", "sora-2", FAST),
    ({}, "sora-2-pro", "sora-2-pro", PRO),
    ({}, PRO, PRO, PRO),
    ({}, FAST, FAST, FAST),
    ({"sora-2": PRO}, "sora-2", "sora-2", PRO),  # the config's entries win over the defaults
    ({"veo-3": FAST}, "sora-2-pro", "sora-2-pro", PRO),  # ... and are merged with them
    ({"veo-3": FAST}, "veo-3", "veo-3", FAST),
    # the dated snapshots the openai SDKs list: mapped like their family, shown as sent
    ({}, "sora-2-2025-10-06", "sora-2-2025-10-06", FAST),
    ({}, "sora-2-2025-12-08", "sora-2-2025-12-08", FAST),
    ({}, "sora-2-pro-2025-10-06", "sora-2-pro-2025-10-06", PRO),
    ({"sora-2": PRO}, "sora-2-2025-12-08", "sora-2-2025-12-08", PRO),  # ... whatever the family is configured to
    ({"sora-2-2025-10-06": PRO}, "sora-2-2025-10-06", "sora-2-2025-10-06", PRO),  # ... unless configured itself
    ({"sora-2-2025-10-06": PRO}, "sora-2-2025-12-08", "sora-2-2025-12-08", FAST),
]


@pytest.mark.parametrize(("aliases", "model", "shown", "seedance"), MODELS)
def test_model_aliases(aliases, model, shown, seedance):
    t = create(aliases, model=model)
    assert (t.body["model"], t.facts.model) == (seedance, shown)


@pytest.mark.parametrize(("aliases", "model"), [({}, "sora-3"), ({}, 5), ({}, ""), ({"veo-3": "unpriced"}, "veo-3")])
def test_unknown_model_is_invalid(aliases, model):
    exc = rejected(ValidationError, "model", create, aliases, model=model)
    assert "sora-2" in exc.message and PRO in exc.message and "veo-3" not in exc.message


@pytest.mark.parametrize("model", ["sora-2-2025-10-07", "sora-2-pro-2025-12-08", "SORA-2-2025-10-06"])
def test_only_the_listed_snapshots_are_aliases(model):
    exc = rejected(ValidationError, "model", create, model=model)
    assert "sora-2-2025-10-06" in exc.message and "sora-2-pro-2025-10-06" in exc.message


def test_the_snapshots_are_the_ones_the_sdk_lists():
    listed = set(typing.get_args(typing.get_args(VideoModel)[1]))
    assert listed == {*DEFAULT_ALIASES, *SNAPSHOTS}
    assert {SNAPSHOTS[name] for name in SNAPSHOTS} <= set(DEFAULT_ALIASES)


def test_defaults_give_exactly_the_seedance_fields():
    t = create()
    assert t.body == {"model": FAST, "prompt": "a cat", "duration": 4, "resolution": "720p", "aspect_ratio": "9:16"}
    assert t.facts == VideoFacts("sora-2", "4", "720x1280", "a cat")


def test_sdk_defaults_written_out_map_like_the_guide():
    t = create(model="sora-2-pro", seconds="8", size="1280x720")
    assert t.body == {"model": PRO, "prompt": "a cat", "duration": 8, "resolution": "720p", "aspect_ratio": "16:9"}


@pytest.mark.parametrize("prompt", [None, 5, ["a cat"]])
def test_prompt_must_be_a_string(prompt):
    rejected(ValidationError, "prompt", to_seedance, {"prompt": prompt}, {}, PRICING)


@pytest.mark.parametrize("name", ["resolution", "duration", "metadata", "n", "foo"])
def test_unknown_fields_are_unsupported(name):
    assert rejected(UnsupportedParameter, name, create, **{name: "x"}).code == "unsupported_parameter"


def test_an_unknown_field_name_is_echoed_bounded():
    exc = rejected(UnsupportedParameter, "x" * 64, create, **{"x" * 10_000: "1"})
    assert len(exc.message) < 300


def test_null_fields_count_as_absent():
    assert create(model=None, seconds=None, size=None, input_reference=None, foo=None).body == create().body


IMAGE_IDS = ["png", "jpeg", "webp", "gif", "mp4", "mov", "webm", "heic", "empty", "text", "wav", "png-cut", "jpeg-cut"]
IMAGES = [
    (PNG, "image/png"),
    (JPEG, "image/jpeg"),
    (WEBP, "image/webp"),
    (GIF, None),
    (MP4, None),
    (MOV, None),
    (WEBM, None),
    (HEIC, None),
    (b"", None),
    (b"hello", None),
    (b"RIFF\0\0\0\0WAVEfmt ", None),
    (b"\x89PNG", None),
    (b"\xff\xd8", None),
]


@pytest.mark.parametrize(("data", "media_type"), IMAGES, ids=IMAGE_IDS)
def test_sniff_image_by_bytes(data, media_type):
    assert sniff_image(data) == media_type


@pytest.mark.parametrize("declared", [None, "application/octet-stream", "image/jpeg", "video/mp4", "text/plain"])
@pytest.mark.parametrize(("data", "media_type"), IMAGES[:3], ids=IMAGE_IDS[:3])
def test_uploaded_image_becomes_a_first_frame_data_url_whatever_its_declared_type(data, media_type, declared):
    t = create(upload=Upload.of(data, declared, "upload"))
    url = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
    sent = orjson.loads(t.json())
    assert sent["content"] == [{"type": "image_url", "image_url": {"url": url}, "role": "first_frame"}]
    assert set(sent) == set(t.body) == {"model", "prompt", "duration", "resolution", "aspect_ratio", "content"}
    assert url.startswith(t.body["content"][0]["image_url"]["url"])  # what §4 validates: the URL's start


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (MP4, "a video"),
        (MOV, "a video"),
        (WEBM, "a video"),
        (GIF, "this kind"),
        (HEIC, "this kind"),
        (b"", "this kind"),
    ],
    ids=["mp4", "mov", "webm", "gif", "heic", "empty"],
)
def test_other_uploads_are_unsupported(data, says):
    exc = rejected(UnsupportedParameter, "input_reference", create, upload=Upload.of(data, "image/png"))
    assert says in exc.message


def test_image_size_limit():
    at_limit = PNG + b"\x00" * (MAX_IMAGE_BYTES - len(PNG))
    sent = orjson.loads(create(upload=Upload.of(at_limit)).json())
    assert sent["content"][0]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(at_limit).decode()
    exc = rejected(ValidationError, "input_reference", create, upload=Upload.of(at_limit + b"\x00"))
    assert exc.code == "invalid_parameter" and "10 MiB" in exc.message


@pytest.mark.parametrize("url", ["https://cdn.example.com/a.png", "data:image/png;base64,AAAA"])
def test_json_image_url_passes_through(url):
    t = create(input_reference={"image_url": url})
    assert t.body["content"] == [{"type": "image_url", "image_url": {"url": url}, "role": "first_frame"}]


@pytest.mark.parametrize(
    ("value", "exc_type"),
    [
        ({"file_id": "file_123"}, UnsupportedParameter),
        ({"image_url": "https://a/b.png", "file_id": "f"}, UnsupportedParameter),
        ("file_123", UnsupportedParameter),
        ("https://a/b.png", UnsupportedParameter),
        ({}, UnsupportedParameter),
        ({"image_url": 5}, ValidationError),
        ({"image_url": ""}, ValidationError),
    ],
)
def test_other_references_are_rejected(value, exc_type):
    rejected(exc_type, "input_reference", create, input_reference=value)


def test_reference_given_twice():
    rejected(
        ValidationError, "input_reference", create, upload=Upload.of(PNG), input_reference={"image_url": "https://a/b"}
    )


def test_mapped_bodies_pass_the_tokenhub_validation():
    for fields, upload in [
        ({}, None),
        ({"size": "854x480", "seconds": 15, "model": "sora-2-pro"}, None),
        ({"input_reference": {"image_url": "https://cdn.example.com/a.png"}}, None),
        ({}, Upload.of(JPEG)),
    ]:
        t = create(upload=upload, **fields)
        req = validate(t.body, PRICING)
        assert (req.model, req.resolution, req.duration_s) == (
            t.body["model"],
            t.body["resolution"],
            t.body["duration"],
        )


@pytest.mark.parametrize(
    ("param", "client"),
    [
        ("duration", "seconds"),
        ("resolution", "size"),
        ("aspect_ratio", "size"),
        ("model", "model"),
        ("prompt", "prompt"),
        ("content[0].image_url.url", "input_reference"),
        ("content", "input_reference"),
        ("video_durations[0]", "input_reference"),
        (None, None),
        ("Idempotency-Key", "Idempotency-Key"),
    ],
)
def test_client_param(param, client):
    assert client_param(param) == client


# remix

SOURCE = VideoFacts("sora-2-pro", "8", "1280x720", "a cat")
SOURCE_URL = "https://cdn.tokenhub.example/v/abc.mp4"


def remix(fields, **kw):
    return remix_body("vid_src", kw.pop("source", SOURCE), SOURCE_URL, fields, {}, PRICING, **kw)


def test_remix_keeps_the_sources_model_size_and_seconds():
    t = remix({"prompt": "now at night"})
    assert t.body == {
        "model": PRO,
        "prompt": "now at night",
        "duration": 8,
        "resolution": "720p",
        "aspect_ratio": "16:9",
        "content": [{"type": "video_url", "video_url": {"url": SOURCE_URL}, "role": "reference_video"}],
        "video_durations": [8],
    }
    assert t.facts == VideoFacts("sora-2-pro", "8", "1280x720", "now at night", "vid_src")
    req = validate(t.body, PRICING)
    assert (req.input_s, req.input_estimated, req.reference_videos) == (8, False, 1)


def test_remix_overrides_and_real_source_seconds():
    t = remix({"prompt": "p", "model": "sora-2", "size": "480x480", "seconds": "4"}, source_seconds=8.04)
    assert (t.body["model"], t.body["resolution"], t.body["aspect_ratio"]) == (FAST, "480p", "1:1")
    assert t.body["duration"] == 4
    assert t.body["video_durations"] == [8.04]
    assert (t.facts.model, t.facts.size, t.facts.seconds) == ("sora-2", "480x480", "4")


@pytest.mark.parametrize("reported", [None, 1.5, 15.2, 0])
def test_remix_source_seconds_out_of_range_fall_back_to_the_requested(reported):
    assert remix({"prompt": "p"}, source_seconds=reported).body["video_durations"] == [8]


def test_remix_of_a_tokenhub_shape_task():
    t = remix({"prompt": "p"}, source=VideoFacts(FAST, "5", "854x480"))
    assert (t.body["model"], t.body["duration"], t.body["resolution"], t.facts.model) == (FAST, 5, "480p", FAST)


@pytest.mark.parametrize(
    ("fields", "param", "exc_type"),
    [
        ({}, "prompt", ValidationError),
        ({"prompt": "p", "input_reference": {"image_url": "https://a"}}, "input_reference", UnsupportedParameter),
        ({"prompt": "p", "seconds": "20"}, "seconds", ValidationError),
    ],
)
def test_remix_errors(fields, param, exc_type):
    rejected(exc_type, param, remix, fields)


# multipart fields and the fingerprint


def test_form_fields():
    up = Upload.of(PNG, "application/octet-stream", "upload")
    assert form_fields([("prompt", "a"), ("seconds", "8"), ("input_reference", up)]) == (
        {"prompt": "a", "seconds": "8"},
        up,
    )
    assert form_fields([("prompt", "a"), ("input_reference[image_url]", "https://a/b.png")]) == (
        {"prompt": "a", "input_reference": {"image_url": "https://a/b.png"}},
        None,
    )


@pytest.mark.parametrize(
    ("parts", "param"),
    [
        ([("prompt", "a"), ("prompt", "b")], "prompt"),
        ([("input_reference", Upload.of(PNG)), ("input_reference", Upload.of(PNG))], "input_reference"),
        ([("input_reference", Upload.of(PNG)), ("input_reference[image_url]", "https://a")], "input_reference"),
        ([("input_reference[image_url]", "https://a"), ("input_reference", "x")], "input_reference"),
        ([("prompt", Upload.of(b"a cat"))], "prompt"),
        ([("input_reference[image_url]", Upload.of(PNG))], "input_reference[image_url]"),
        ([("y" * 500, "a"), ("y" * 500, "b")], "y" * 64),
    ],
)
def test_form_fields_refused(parts, param):
    rejected(ValidationError, param, form_fields, parts)


FIELDS = {"prompt": "a cat", "model": "sora-2", "seconds": "8", "size": "1280x720"}


def test_fingerprint_same_fields_same_print():
    assert fingerprint(FIELDS) == fingerprint(dict(reversed(list(FIELDS.items()))))
    assert fingerprint(FIELDS, Upload.of(PNG, "image/png", "a.png")) == fingerprint(
        FIELDS, Upload.of(PNG, None, "upload")
    )
    assert fingerprint({**FIELDS, "size": None}) == fingerprint({k: v for k, v in FIELDS.items() if k != "size"})


@pytest.mark.parametrize(
    ("other", "upload", "remix_of"),
    [
        ({**FIELDS, "prompt": "a dog"}, None, None),
        ({**FIELDS, "seconds": 8}, None, None),
        (FIELDS, Upload.of(PNG), None),
        (FIELDS, None, "vid_1"),
    ],
)
def test_fingerprint_differs(other, upload, remix_of):
    assert fingerprint(other, upload, remix_of=remix_of) != fingerprint(FIELDS)


def test_fingerprint_by_file_content_and_remix_source():
    assert fingerprint(FIELDS, Upload.of(PNG)) != fingerprint(FIELDS, Upload.of(PNG + b"\x00"))
    assert fingerprint(FIELDS, remix_of="vid_1") != fingerprint(FIELDS, remix_of="vid_2")


# what the official openai SDK sends, parsed as the route will (starlette's form parser)


def sdk_requests(*calls):
    sent = []

    def handler(request):
        sent.append(request)
        return httpx2.Response(
            200,
            json={
                "id": "video_1",
                "object": "video",
                "status": "queued",
                "progress": 0,
                "created_at": 1,
                "model": "sora-2",
                "seconds": "4",
                "size": "720x1280",
            },
        )

    client = openai.OpenAI(
        base_url="http://gateway.test/v1",
        api_key="tgw-test",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    for call in calls:
        call(client.videos)
    return sent


async def parsed(request):
    body = request.read()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": request.url.path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
    }
    form = await Request(scope, receive).form()
    parts = [
        (
            name,
            Upload.of(await value.read(), value.content_type, value.filename)
            if isinstance(value, UploadFile)
            else value,
        )
        for name, value in form.multi_items()
    ]
    return form_fields(parts)


async def test_sdk_create_is_multipart_with_string_fields_and_an_octet_stream_file():
    (req,) = sdk_requests(
        lambda v: v.create(prompt="a cat", model="sora-2-pro", seconds="8", size="1792x1024", input_reference=PNG)
    )
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    fields, upload = await parsed(req)
    assert fields == {"prompt": "a cat", "model": "sora-2-pro", "seconds": "8", "size": "1792x1024"}
    assert (upload.file.read(), upload.content_type, upload.filename) == (PNG, "application/octet-stream", "upload")
    t = to_seedance(fields, {}, PRICING, upload)
    assert (t.body["model"], t.body["duration"], t.body["aspect_ratio"]) == (PRO, 8, "16:9")
    assert orjson.loads(t.json())["content"][0]["image_url"]["url"] == PNG_URL


async def test_sdk_retry_of_the_same_call_has_the_same_fingerprint_whatever_the_boundary():
    call = lambda v: v.create(prompt="a cat", seconds="4", input_reference=("cat.jpg", JPEG, "image/jpeg"))  # noqa: E731
    first, second = sdk_requests(call, call)
    assert first.headers["content-type"] != second.headers["content-type"]  # a fresh boundary each time
    assert fingerprint(*await parsed(first)) == fingerprint(*await parsed(second))


async def test_sdk_create_without_a_file_and_with_extra_body():
    plain, extra = sdk_requests(
        lambda v: v.create(prompt="a cat"),
        lambda v: v.create(prompt="a cat", seconds=8, extra_body={"watermark": "true"}),
    )
    assert await parsed(plain) == ({"prompt": "a cat"}, None)
    fields, _ = await parsed(extra)
    assert fields == {"prompt": "a cat", "seconds": "8", "watermark": "true"}
    rejected(UnsupportedParameter, "watermark", to_seedance, fields, {}, PRICING)


def test_sdk_remix_is_json_with_the_prompt_only():
    (req,) = sdk_requests(lambda v: v.remix("video_1", prompt="at night"))
    assert (req.url.path, req.headers["content-type"], req.read()) == (
        "/v1/videos/video_1/remix",
        "application/json",
        b'{"prompt":"at night"}',
    )


def test_a_data_url_kept_in_the_request_bytes_translates_and_prints_as_its_whole_string():
    url = PNG_URL + "A" * 1000
    raw = orjson.dumps({"prompt": "a cat", "input_reference": {"image_url": url}})
    begin = raw.index(b"data:")
    held = {"prompt": "a cat", "input_reference": {"image_url": Passage(Span(raw, begin, begin + len(url)))}}
    whole = {"prompt": "a cat", "input_reference": {"image_url": url}}
    assert fingerprint(held) == fingerprint(whole)
    assert fingerprint(held) != fingerprint({"prompt": "a cat", "input_reference": {"image_url": url + "A"}})
    assert create(**held).json() == orjson.dumps(create(**whole).body)
    assert validate(create(**held).body, PRICING) == validate(create(**whole).body, PRICING)
