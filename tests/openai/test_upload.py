import base64
import hashlib
import io

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ValidationError
from gateway.openai.upload import CHUNK_BYTES, Image, Passage, Span, Upload, dumps, holds_passage, sha256_json
from gateway.policy.validation import validate
from tests.doubles import PRICING

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | TEXT


def image_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def body_with(url: object, prompt: str = "a cat", **extra: object) -> dict[str, object]:
    """A Seedance body as translate builds it, `url` in its content."""
    return {
        "model": "doubao-seedance-2.0",
        "prompt": prompt,
        "duration": 4,
        **extra,
        "content": [{"type": "image_url", "image_url": {"url": url}, "role": "first_frame"}],
    }


class Trickle(io.RawIOBase):
    """A file that hands out at most `most` bytes a read, as a raw file or a pipe may."""

    def __init__(self, data: bytes, most: int) -> None:
        self.inner = io.BytesIO(data)
        self.most = most

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.inner.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        return self.inner.read(min(size, self.most) if size >= 0 else self.most)


# The sizes where the chunking could go wrong: empty, short, at and around chunk edges, several chunks.
SIZES = [0, 1, 2, 3, 4, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES + 2]


@pytest.mark.parametrize("size", SIZES)
def test_an_uploaded_image_is_sent_as_the_same_bytes_as_its_whole_data_url(size):
    data = (PNG_HEAD + bytes(range(256)) * (size // 256 + 1))[:size]
    passage = Passage(Image("image/png", Upload.of(data)))
    assert dumps(body_with(passage)) == orjson.dumps(body_with(image_url(data)))
    assert image_url(data).startswith(passage)


@pytest.mark.parametrize("most", [1, 7, 1000, CHUNK_BYTES - 1])
def test_short_reads_keep_the_base64_whole(most):
    data = bytes(range(256)) * (CHUNK_BYTES // 256 + 1)  # past one chunk
    upload = Upload(Trickle(data, most), len(data), data[:16])  # type: ignore[arg-type]
    sent = dumps(body_with(Passage(Image("image/jpeg", upload))))
    assert orjson.loads(sent)["content"][0]["image_url"]["url"] == image_url(data, "image/jpeg")
    assert upload.sha256() == hashlib.sha256(data).hexdigest()


def test_a_file_is_read_from_its_start_every_time():
    data = PNG_HEAD + bytes(5000)
    upload = Upload.of(data)
    upload.file.seek(100)
    assert upload.sha256() == upload.sha256() == hashlib.sha256(data).hexdigest()
    assert b"".join(upload.chunks()) == data


@given(
    prompt=TEXT,
    data=st.binary(max_size=300),
    extra=st.dictionaries(st.sampled_from(["a", "zz", "watermark", "Ä"]), JSON_LEAVES, max_size=3),
    sort_keys=st.booleans(),
)
def test_written_whole_it_is_orjson_of_the_whole_value_whatever_else_the_body_holds(prompt, data, extra, sort_keys):
    url = image_url(PNG_HEAD + data)
    passage = Passage(Image("image/png", Upload.of(PNG_HEAD + data)))
    for held_prompt in (prompt, str(passage), f'"{passage}"'):  # a prompt that spells the URL's start, too
        option = orjson.OPT_SORT_KEYS if sort_keys else None
        whole = orjson.dumps(body_with(url, held_prompt, **extra), option=option)
        assert dumps(body_with(passage, held_prompt, **extra), sort_keys=sort_keys) == whole
        assert sha256_json(body_with(passage, held_prompt, **extra), sort_keys=sort_keys) == (
            hashlib.sha256(whole).hexdigest()
        )


def test_a_span_writes_the_bytes_it_lies_on():
    url = image_url(PNG_HEAD + bytes(1000))
    raw = b'{"prompt":"x","input_reference":{"image_url":"' + url.encode() + b'"}}'
    begin = raw.index(b"data:")
    passage = Passage(Span(raw, begin, begin + len(url)))
    fields = {"prompt": "x", "input_reference": {"image_url": passage}}
    assert dumps(fields) == raw
    assert sha256_json(fields, sort_keys=True) == hashlib.sha256(_sorted(raw)).hexdigest()
    assert str(passage) == "data:image/png;base64,i"  # up to the comma and one character more


def _sorted(raw: bytes) -> bytes:
    return orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)


def test_without_a_passage_it_is_orjson():
    value = {"b": [1, {"c": None}], "a": "x"}
    assert not holds_passage(value)
    assert dumps(value) == orjson.dumps(value)
    assert (
        sha256_json(value, sort_keys=True)
        == hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()
    )
    deep: list[object] = []
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    assert not holds_passage(deep)


# §4's verdict on a data: URI is read from its start: a Passage (made only of a string starting "data:")
# gets the verdict its whole string would.

SCHEMES = st.sampled_from(["data:", "DATA:", "Data:"])
PIECES = st.sampled_from(["image", "audio", "video", "/", "png", "x-icon", ";base64,", ",", "A", "+=", " ", ";", ":"])
DATA_URLS = st.tuples(SCHEMES, st.lists(PIECES, max_size=12).map("".join)).map("".join)


def verdict(url: str) -> tuple[str | None, str] | None:
    try:
        validate(body_with(url), PRICING)
    except ValidationError as exc:
        return exc.param, exc.message
    return None


@given(DATA_URLS, st.integers(0, 3))
def test_the_start_of_a_data_url_has_the_verdict_of_the_whole(url, padding):
    raw = b"x" * padding + b'"' + url.encode() + b'"'
    passage = Passage(Span(raw, padding + 1, padding + 1 + len(url)))
    assert url.startswith(passage)
    assert verdict(passage) == verdict(url)
