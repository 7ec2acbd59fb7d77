"""The fields of a /videos create: a multipart file left in its spooled file while the fields are in use, and a
long data: URL of a large JSON body found in the body's bytes rather than sent back from the worker whole."""

from __future__ import annotations

import base64

import httpx
import orjson
import pytest
from starlette.requests import Request

from gateway.errors import InvalidJSON
from gateway.http.workers import BodyWorkers
from gateway.openai.upload import Passage, Span
from gateway.routes.videos_input import LONG_URL_CHARS, located_json, read_fields

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
LONG_URL = "data:image/png;base64," + base64.b64encode(PNG_HEAD + bytes(range(256)) * 300).decode()


def request_of(sent: httpx.Request) -> Request:
    body = sent.read()
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""]

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [(k.lower().encode(), v.encode()) for k, v in sent.headers.items()]
    return Request(
        {"type": "http", "method": "POST", "path": "/v1/videos", "query_string": b"", "headers": headers}, receive
    )


@pytest.mark.parametrize(("size", "on_disk"), [(1000, False), (2 * 1024 * 1024, True)])
async def test_an_uploaded_file_is_left_in_its_spooled_file_until_the_fields_are_done_with(size, on_disk):
    image = PNG_HEAD + bytes(size)
    sent = httpx.Request("POST", "http://gw/v1/videos", data={"prompt": "a fox"}, files={"input_reference": image})
    async with read_fields(request_of(sent), 16 * 1024 * 1024, 5.0, BodyWorkers(1)) as (fields, upload):
        assert fields == {"prompt": "a fox"}
        assert (upload.size, upload.head) == (len(image), image[:16])
        assert upload.file._rolled is on_disk  # past 1 MiB the file is on disk, not in memory
        assert b"".join(upload.chunks()) == image
    assert upload.file.closed


def json_with(url: str, **extra: object) -> bytes:
    return orjson.dumps({"prompt": "a fox", **extra, "input_reference": {"image_url": url}})


def test_a_long_data_url_is_found_where_it_lies_and_left_out_of_the_value():
    decoys = [LONG_URL[:100]] * 5  # its start, before it: not it
    raw = json_with(LONG_URL, decoy=decoys)
    value, where = located_json(raw)
    assert value == {"prompt": "a fox", "decoy": decoys, "input_reference": {"image_url": None}}
    assert where is not None and raw[where[0] : where[1]] == LONG_URL.encode()
    assert Passage(Span(raw, *where)) == LONG_URL[: LONG_URL.index(",") + 2]


@pytest.mark.parametrize(
    "raw",
    [
        json_with(LONG_URL).replace(b"/", b"\\/"),  # written with escapes: its bytes are not the URL's
        json_with(LONG_URL[: LONG_URL_CHARS - 10]),  # short enough to come back whole
        json_with("https://a.example/" + "x" * LONG_URL_CHARS),  # not a data: URL
        json_with(LONG_URL + "é"),  # not ASCII
        json_with(LONG_URL, decoy=[LONG_URL[:100]] * 20),  # its start too often before it: no longer looked for
    ],
    ids=["escaped", "short", "not-data", "not-ascii", "decoys"],
)
def test_any_other_url_comes_back_whole(raw):
    value, where = located_json(raw)
    assert where is None
    assert value == orjson.loads(raw), "the value as parsed"


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b'{"input_reference": "x"}'])
def test_bodies_without_a_long_url_come_back_as_parsed(raw):
    assert located_json(raw) == (orjson.loads(raw), None)


@pytest.mark.parametrize("raw", [b'{"prompt": ', b'{"prompt": "a", "prompt": "b"}'])
def test_invalid_json_is_refused_as_before(raw):
    with pytest.raises(InvalidJSON):
        located_json(raw)
