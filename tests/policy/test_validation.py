import hashlib
from decimal import Decimal

import orjson
import pytest

from gateway.errors import InvalidJSON, ValidationError
from gateway.http.bodies import check, loads_strict
from gateway.policy.validation import MAX_MEDIA_ITEMS, VideoRequest, validate
from tests.doubles import FAST, MODEL, PRICING, body

CUSTOM_PRICING = {**PRICING, "seedance-lite": {"1080p": 300_000}}

IMG = "https://cdn.example.com/a.png"
VID = "https://cdn.example.com/a.mp4"
AUD = "https://cdn.example.com/a.mp3"


def item(kind, url, role=None):
    entry = {"type": f"{kind}_url", f"{kind}_url": {"url": url}}
    return entry if role is None else {**entry, "role": role}


def frame(role="first_frame"):
    return item("image", IMG, role)


# The seed guide's own bodies (curl, Python requests, JavaScript fetch, image-to-video).
GUIDE_TEXT = {
    "model": MODEL,
    "prompt": "A golden retriever running on a sunny beach, waves crashing in the "
    "background, cinematic slow motion, 4K quality",
    "duration": 5,
    "resolution": "720p",
    "aspect_ratio": "16:9",
    "watermark": False,
}
GUIDE_PYTHON = {
    "model": MODEL,
    "prompt": "A majestic eagle soaring over snow-capped mountains, golden hour lighting, cinematic aerial shot",
    "duration": 5,
    "resolution": "720p",
    "aspect_ratio": "16:9",
    "watermark": False,
}
GUIDE_JS = {
    "model": MODEL,
    "prompt": "A majestic eagle soaring over snow-capped mountains, cinematic aerial shot",
    "duration": 5,
    "resolution": "720p",
    "aspect_ratio": "16:9",
    "watermark": False,
}
GUIDE_IMAGE = {
    "model": MODEL,
    "prompt": "The woman in the photo turns to face the camera and smiles warmly, her hair gently blowing in the wind",
    "duration": 5,
    "resolution": "720p",
    "image_url": "https://your-bucket.com/portrait.jpg",
    "watermark": False,
}

GOOD = [
    ("guide curl", GUIDE_TEXT, (MODEL, "720p", 5, Decimal(0), False, 0)),
    ("guide python", GUIDE_PYTHON, (MODEL, "720p", 5, Decimal(0), False, 0)),
    ("guide js", GUIDE_JS, (MODEL, "720p", 5, Decimal(0), False, 0)),
    ("guide image-to-video", GUIDE_IMAGE, (MODEL, "720p", 5, Decimal(0), False, 0)),
    ("defaults", body(), (MODEL, "720p", 5, Decimal(0), False, 0)),
    ("fast 480p 15 s", body(model=FAST, resolution="480p", duration=15), (FAST, "480p", 15, Decimal(0), False, 0)),
    ("duration 4", body(duration=4), (MODEL, "720p", 4, Decimal(0), False, 0)),
    (
        "nulls are absent",
        body(
            duration=None,
            resolution=None,
            aspect_ratio=None,
            content=None,
            video_durations=None,
            input_video_duration=None,
            watermark=None,
        ),
        (MODEL, "720p", 5, Decimal(0), False, 0),
    ),
    ("video without duration reserves 15 s", body(video_url=VID), (MODEL, "720p", 5, Decimal(15), True, 1)),
    (
        "video_durations summed",
        body(video_urls=[VID, VID], video_durations=[3, 5.5]),
        (MODEL, "720p", 5, Decimal("8.5"), False, 2),
    ),
    ("input_video_duration", body(video_url=VID, input_video_duration=7), (MODEL, "720p", 5, Decimal(7), False, 1)),
    (
        "both durations agreeing",
        body(video_urls=[VID, VID], video_durations=[3, 5], input_video_duration=8.0),
        (MODEL, "720p", 5, Decimal(8), False, 2),
    ),
    (
        "content videos counted",
        body(
            content=[item("video", VID, "reference_video"), item("video", VID)],
            video_url=VID,
            video_durations=[2, 5, 8],
        ),
        (MODEL, "720p", 5, Decimal(15), False, 3),
    ),
    ("first frame", body(content=[frame()]), (MODEL, "720p", 5, Decimal(0), False, 0)),
    (
        "first and last frame",
        body(content=[frame(), frame("last_frame"), {"type": "text", "text": "slowly"}]),
        (MODEL, "720p", 5, Decimal(0), False, 0),
    ),
    (
        "multimodal reference",
        body(
            image_urls=[IMG] * 4,
            content=[item("image", IMG, "reference_image"), item("audio", AUD, "reference_audio")],
            audio_urls=[AUD, AUD],
            video_urls=[VID],
            video_durations=[4],
        ),
        (MODEL, "720p", 5, Decimal(4), False, 1),
    ),
    (
        "9 images 3 videos (12 media)",
        body(image_urls=[IMG] * 9, video_urls=[VID] * 3),
        (MODEL, "720p", 5, Decimal(15), True, 3),
    ),
    (
        "asset and data URIs",
        body(
            image_url="asset://img-123",
            image_urls=["data:image/png;base64,iVBORw0K"],
            audio_url="DATA:audio/mpeg;base64,SUQz",
            video_url="ASSET://vid-9",
        ),
        (MODEL, "720p", 5, Decimal(15), True, 1),
    ),
    (
        "http with port, query and userinfo",
        body(image_urls=["http://user@h.example:8080/x.png?a=1#f", "https://[::1]/x.png", "HTTPS://H.EXAMPLE"]),
        (MODEL, "720p", 5, Decimal(0), False, 0),
    ),
    (
        "unknown fields forwarded",
        body(seed=42, camera_fixed=True, callback_url="ftp://x"),
        (MODEL, "720p", 5, Decimal(0), False, 0),
    ),
    ("prompt of 5000 chars", body(prompt="x" * 5000), (MODEL, "720p", 5, Decimal(0), False, 0)),
    ("booleans", body(generate_audio=False, watermark=True), (MODEL, "720p", 5, Decimal(0), False, 0)),
    ("empty video_durations without videos", body(video_durations=[]), (MODEL, "720p", 5, Decimal(0), False, 0)),
    (
        "empty video_durations is absent",
        body(video_url=VID, video_durations=[]),
        (MODEL, "720p", 5, Decimal(15), True, 1),
    ),
    ("2 s for one video", body(video_url=VID, input_video_duration=2), (MODEL, "720p", 5, Decimal(2), False, 1)),
    (
        "6 s for three videos",
        body(video_urls=[VID] * 3, input_video_duration=6),
        (MODEL, "720p", 5, Decimal(6), False, 3),
    ),
    (
        "4.5 s for two videos",
        body(video_urls=[VID, VID], input_video_duration=4.5),
        (MODEL, "720p", 5, Decimal("4.5"), False, 2),
    ),
]


@pytest.mark.parametrize("payload, expected", [case[1:] for case in GOOD], ids=[case[0] for case in GOOD])
def test_good_bodies(payload, expected):
    assert validate(payload, PRICING) == VideoRequest(*expected, payload.get("aspect_ratio") or "adaptive")


def test_configured_model_and_resolution():
    result = validate(body(model="seedance-lite", resolution="1080p"), CUSTOM_PRICING)
    assert (result.model, result.resolution) == ("seedance-lite", "1080p")


def test_default_resolution_missing_from_model_is_rejected():
    with pytest.raises(ValidationError) as err:
        validate(body(model="seedance-lite"), CUSTOM_PRICING)
    assert err.value.param == "resolution"


BAD = [
    ("list body", [MODEL], None),
    ("string body", "hello", None),
    ("null body", None, None),
    ("missing model", {"prompt": "x"}, "model"),
    ("unknown model", body(model="gpt-4"), "model"),
    ("model not a string", body(model=["x"]), "model"),
    ("missing prompt", {"model": MODEL}, "prompt"),
    ("empty prompt", body(prompt=""), "prompt"),
    ("blank prompt", body(prompt=" \n\t"), "prompt"),
    ("prompt not a string", body(prompt=5), "prompt"),
    ("prompt of 5001 chars", body(prompt="x" * 5001), "prompt"),
    ("duration bool", body(duration=True), "duration"),
    ("duration float", body(duration=5.0), "duration"),
    ("duration string", body(duration="5"), "duration"),
    ("duration 3", body(duration=3), "duration"),
    ("duration 16", body(duration=16), "duration"),
    ("resolution 1080p", body(resolution="1080p"), "resolution"),
    ("resolution not a string", body(resolution=720), "resolution"),
    ("aspect_ratio 2:1", body(aspect_ratio="2:1"), "aspect_ratio"),
    ("aspect_ratio list", body(aspect_ratio=["16:9"]), "aspect_ratio"),
    ("generate_audio int", body(generate_audio=1), "generate_audio"),
    ("watermark string", body(watermark="false"), "watermark"),
    ("image_url not a string", body(image_url=1), "image_url"),
    ("image_urls not an array", body(image_urls=IMG), "image_urls"),
    ("image_urls element", body(image_urls=[IMG, 7]), "image_urls[1]"),
    ("file scheme", body(image_urls=[IMG, "file:///etc/passwd"]), "image_urls[1]"),
    ("ftp scheme", body(video_url="ftp://h.example/a.mp4"), "video_url"),
    ("javascript scheme", body(audio_urls=["javascript:alert(1)"]), "audio_urls[0]"),
    ("relative path", body(image_url="/images/a.png"), "image_url"),
    ("empty URL", body(image_url=""), "image_url"),
    ("http without host", body(image_url="https:///a.png"), "image_url"),
    ("http with only a port", body(image_url="http://:80/a.png"), "image_url"),
    ("URL with a space", body(image_url="https://h.example/a b.png"), "image_url"),
    ("asset without id", body(video_urls=["asset://"]), "video_urls[0]"),
    ("2049-char URL", body(image_url="https://h.example/" + "a" * 2031), "image_url"),
    ("data URI on a flat video", body(video_url="data:video/mp4;base64,AAAA"), "video_url"),
    (
        "data URI on a content video",
        body(content=[item("video", "data:video/mp4;base64,AAAA")]),
        "content[0].video_url.url",
    ),
    (
        "data:image on an audio item",
        body(image_url=IMG, content=[item("audio", "data:image/png;base64,AA")]),
        "content[0].audio_url.url",
    ),
    ("data:audio on an image", body(image_url="data:audio/mpeg;base64,AA"), "image_url"),
    ("data URI not base64", body(image_url="data:image/png,rawbytes"), "image_url"),
    ("data URI without data", body(image_url="data:image/png;base64,"), "image_url"),
    ("content not an array", body(content={"type": "text"}), "content"),
    ("content item not an object", body(content=[frame(), "x"]), "content[1]"),
    ("content item unknown type", body(content=[frame(), {"type": "draft_task"}]), "content[1].type"),
    ("content item missing type", body(content=[{"image_url": {"url": IMG}}]), "content[0].type"),
    ("content media not an object", body(content=[{"type": "image_url", "image_url": IMG}]), "content[0].image_url"),
    ("content media missing url", body(content=[{"type": "image_url", "image_url": {}}]), "content[0].image_url.url"),
    (
        "content bad URL",
        body(content=[frame(), item("image", "ftp://x/y.png", "last_frame")]),
        "content[1].image_url.url",
    ),
    (
        "text item with role",
        body(content=[{"type": "text", "text": "x", "role": "reference_image"}]),
        "content[0].role",
    ),
    ("text item without text", body(content=[{"type": "text"}]), "content[0].text"),
    ("unknown role", body(content=[frame(), item("image", IMG, "middle_frame")]), "content[1].role"),
    ("role not a string", body(content=[item("image", IMG, 1)]), "content[0].role"),
    ("video as first_frame", body(content=[item("video", VID, "first_frame")]), "content[0].role"),
    ("image as reference_video", body(content=[item("image", IMG, "reference_video")]), "content[0].role"),
    (
        "audio as reference_image",
        body(image_url=IMG, content=[item("audio", AUD, "reference_image")]),
        "content[0].role",
    ),
    ("two first frames", body(content=[frame(), frame()]), "content[1].role"),
    ("two last frames", body(content=[frame(), frame("last_frame"), frame("last_frame")]), "content[2].role"),
    ("last frame alone", body(content=[frame("last_frame")]), "content[0].role"),
    ("first frame with flat reference image", body(image_url=IMG, content=[frame()]), "content[0].role"),
    ("first frame with content reference image", body(content=[item("image", IMG), frame()]), "content[1].role"),
    (
        "first and last frame with reference video",
        body(video_url=VID, content=[frame(), frame("last_frame")]),
        "content[0].role",
    ),
    ("first frame with reference audio", body(content=[frame(), item("audio", AUD)]), "content[0].role"),
    ("10 reference images", body(image_urls=[IMG] * 10), "image_urls"),
    (
        "10 reference images across flat and content",
        body(image_urls=[IMG] * 9, content=[item("image", IMG)]),
        "content",
    ),
    ("4 reference videos", body(video_urls=[VID] * 3, video_url=VID), "video_urls"),
    ("4 reference audios", body(image_url=IMG, audio_urls=[AUD] * 4), "audio_urls"),
    ("13 media items", body(image_urls=[IMG] * 9, video_urls=[VID] * 3, audio_url=AUD), "audio_url"),
    (
        "13 media items in content",
        body(image_urls=[IMG] * 8, content=[item("video", VID)] * 3 + [item("audio", AUD)] * 2),
        "content",
    ),
    ("audio-only flat reference", body(audio_url=AUD), "audio_url"),
    ("audio-only content reference", body(content=[item("audio", AUD), {"type": "text", "text": "x"}]), "content"),
    ("video_durations not an array", body(video_url=VID, video_durations=5), "video_durations"),
    ("video_durations without videos", body(video_durations=[5]), "video_durations"),
    ("video_durations too few", body(video_urls=[VID, VID], video_durations=[5]), "video_durations"),
    ("video_durations too many", body(video_url=VID, video_durations=[5, 5]), "video_durations"),
    (
        "video_durations miss content video",
        body(video_url=VID, content=[item("video", VID)], video_durations=[5]),
        "video_durations",
    ),
    ("video_durations total above 15", body(video_urls=[VID] * 3, video_durations=[5, 5, 5.5]), "video_durations"),
    ("video duration below 2", body(video_url=VID, video_durations=[1.5]), "video_durations[0]"),
    ("video duration above 15", body(video_urls=[VID, VID], video_durations=[3, 16]), "video_durations[1]"),
    ("video duration bool", body(video_url=VID, video_durations=[True]), "video_durations[0]"),
    ("video duration string", body(video_url=VID, video_durations=["5"]), "video_durations[0]"),
    ("video duration NaN", body(video_url=VID, video_durations=[float("nan")]), "video_durations[0]"),
    ("input_video_duration without videos", body(input_video_duration=5), "input_video_duration"),
    ("input_video_duration zero", body(video_url=VID, input_video_duration=0), "input_video_duration"),
    ("input_video_duration above 15", body(video_url=VID, input_video_duration=15.5), "input_video_duration"),
    ("input_video_duration bool", body(video_url=VID, input_video_duration=True), "input_video_duration"),
    ("input_video_duration infinite", body(video_url=VID, input_video_duration=float("inf")), "input_video_duration"),
    (
        "durations disagree",
        body(video_urls=[VID, VID], video_durations=[3, 5], input_video_duration=9),
        "input_video_duration",
    ),
    # each reference video counts at least 2 s
    ("0.001 s for three videos", body(video_urls=[VID] * 3, input_video_duration=0.001), "input_video_duration"),
    ("5.9 s for three videos", body(video_urls=[VID] * 3, input_video_duration=5.9), "input_video_duration"),
    ("1.5 s for one video", body(video_url=VID, input_video_duration=1.5), "input_video_duration"),
    (
        "3.9 s for a flat and a content video",
        body(video_url=VID, content=[item("video", VID)], input_video_duration=3.9),
        "input_video_duration",
    ),
    # counts come before per-item checks: the error is the count, whatever the items hold
    ("10 bad image URLs", body(image_urls=["ftp://x/a.png"] * 10), "image_urls"),
    ("10 image URLs that are not strings", body(image_urls=[7] * 10), "image_urls"),
    ("4 video data: URIs", body(video_urls=["data:video/mp4;base64,AAAA"] * 4), "video_urls"),
    (
        "13 content items, a bad URL first",
        body(content=[item("image", "ftp://x")] + [item("image", IMG)] * 12),
        "content",
    ),
    (
        "4 audio items with image data: URIs",
        body(image_url=IMG, content=[item("audio", "data:image/png;base64,A")] * 4),
        "content",
    ),
    ("video_durations too many, bad items", body(video_url=VID, video_durations=["x", -1]), "video_durations"),
]


@pytest.mark.parametrize("payload, param", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_bodies(payload, param):
    with pytest.raises(ValidationError) as err:
        validate(payload, PRICING)
    assert err.value.param == param
    assert err.value.message


def test_non_object_body_message():
    with pytest.raises(ValidationError, match="JSON object"):
        validate([], PRICING)


def test_2048_char_url_is_accepted():
    url = "https://h.example/" + "a" * 2030
    assert len(url) == 2048
    assert validate(body(image_url=url), PRICING).reference_videos == 0


def test_large_data_uri_is_not_length_limited():
    url = "data:image/jpeg;base64," + "A" * 5_000_000
    assert validate(body(image_url=url), PRICING).input_s == 0


def test_body_is_not_modified():
    payload = body(content=[item("image", IMG)], video_url=VID)
    snapshot = repr(payload)
    validate(payload, PRICING)
    assert repr(payload) == snapshot


class Touched(list):
    """A list that counts the items validation reads from it."""

    read = 0

    def __iter__(self):
        for value in super().__iter__():
            self.read += 1
            yield value


@pytest.mark.parametrize(
    "field, entry, param",
    [
        ("image_urls", IMG, "image_urls"),
        ("image_urls", "ftp://not-checked", "image_urls"),
        ("video_urls", "data:video/mp4;base64,AAAA", "video_urls"),
        ("content", item("image", IMG), "content"),
        ("content", item("image", "data:image/png;base64," + "A" * 100), "content"),
    ],
    ids=["urls", "bad urls", "video data URIs", "content items", "content data URIs"],
)
def test_a_million_items_are_refused_after_reading_a_few(field, entry, param):
    items = Touched([entry] * 1_000_000)
    with pytest.raises(ValidationError) as err:
        validate(body(**{field: items}), PRICING)
    assert err.value.param == param
    assert items.read <= MAX_MEDIA_ITEMS + 1


def test_text_items_are_walked_without_per_item_errors():
    items = Touched([{"type": "text", "text": "slowly"}] * 10_000 + [item("image", IMG)])
    assert validate(body(content=items), PRICING).reference_videos == 0
    assert items.read == 10_001


# --- strict JSON ------------------------------------------------------------------------------------

REPEATED = [
    ("top level", b'{"model": "a", "model": "b"}'),
    ("nested object", b'{"content": [{"type": "image_url", "image_url": {"url": "x", "url": "y"}}]}'),
    ("second object of an array", b'[{"x": 1}, {"x": 2, "x": 3}]'),
    ("deep", b'{"a": {"b": {"c": {"d": 1, "d": 1}}}}'),
    ("same value", b'{"a": 1, "a": 1}'),
    ("escaped spelling", b'{"prompt": "x", "\\u0070rompt": "y"}'),
    ("key with a colon", b'{"k:": 1, "k:": 2}'),
    ("key with an escaped quote", b'{"a\\"": 1, "a\\"": 2}'),
    ("dropped value with colons", b'{"a": "b:c:d", "a": "e"}'),
    ("escaped colons make up for dropped ones", b'{"a": "b:", "a": "\\u003a\\u003a"}'),
    ("dropped subtree", b'{"a": {"x": 1, "y": 2}, "a": 3}'),
    ("after whitespace", b'{ "a" : 1 ,\n "a"\t: 2 }'),
    ("non-ASCII key", '{"prompté": 1, "prompté": 2}'.encode()),
]
NOT_REPEATED = [
    ("colons in values", b'{"u": "https://x.example/a.png", "r": "16:9", "t": "a: b: c"}'),
    ("same key in sibling objects", b'[{"type": "text"}, {"type": "text"}]'),
    ("same key nested", b'{"a": {"a": {"a": 1}}}'),
    ("escaped colon", b'{"a": "\\u003a", "b": "x"}'),
    ("escaped backslash before u", b'{"a": "\\\\u003a", "b": 1}'),
    ("keys that differ by an escape", b'{"a": 1, "\\u0062": 2}'),
    ("key that is a prefix", b'{"a": 1, "a:": 2, "aa": 3}'),
    ("empty containers", b'{"a": {}, "b": [], "c": [{}]}'),
    ("scalars", b'[1, "x", null, true]'),
]


@pytest.mark.parametrize("raw", [c[1] for c in REPEATED], ids=[c[0] for c in REPEATED])
def test_a_repeated_key_is_invalid_json(raw):
    with pytest.raises(InvalidJSON) as err:
        loads_strict(raw)
    assert (err.value.code, err.value.status) == ("invalid_json", 400)


@pytest.mark.parametrize("raw", [c[1] for c in NOT_REPEATED], ids=[c[0] for c in NOT_REPEATED])
def test_keys_without_repeats_parse_as_json_does(raw):
    assert loads_strict(raw) == orjson.loads(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": NaN}', b'{"a": 1} x', b"\xef\xbb\xbf{}", b"{'a': 1}"])
def test_malformed_json_is_invalid_json(raw):
    with pytest.raises(InvalidJSON):
        loads_strict(raw)


def test_a_create_with_a_repeated_key_is_refused_before_validation():
    raw = orjson.dumps(body())[:-1] + b', "model": "no-such-model"}'
    with pytest.raises(InvalidJSON):
        check(raw, PRICING)


def test_body_hash_is_the_canonical_sha256_whatever_the_spelling():
    spaced = check(b'{"model": "doubao-seedance-2.0", "prompt": "a fox", "duration": 5}', PRICING)
    compact = check(b'{"duration":5,\n "prompt":"a \\u0066ox","model":"doubao-seedance-2.0"}', PRICING)
    assert spaced == compact
    assert (
        spaced.body_hash
        == hashlib.sha256(
            orjson.dumps({"duration": 5, "model": MODEL, "prompt": "a fox"}, option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
    )
    assert spaced.request == validate(body(prompt="a fox", duration=5), PRICING)


def test_without_an_idempotency_key_no_hash_is_made_and_the_checks_are_the_same():
    raw = b'{"model": "doubao-seedance-2.0", "prompt": "a fox", "duration": 5}'
    unhashed = check(raw, PRICING, hashed=False)
    assert (unhashed.request, unhashed.body_hash) == (check(raw, PRICING).request, None)
    with pytest.raises(InvalidJSON):
        check(b'{"model": "doubao-seedance-2.0", "prompt": "a", "prompt": "b", "duration": 5}', PRICING, hashed=False)
