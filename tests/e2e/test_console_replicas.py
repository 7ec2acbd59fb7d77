"""The console through two replicas on one Redis (SPEC §16): a session made on one is valid on the other, a
sign-out on either ends it on both, and a key revoked on one ends its session on the other within a second."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.harness import Gateway, Simulator

TEAMS = {"red": {}}
USERS = {"alice": {"team": "red", "role": "team_admin"}, "bob": {"team": "red"}}


@pytest.fixture(scope="module")
def replicas(simulator: Simulator, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Gateway]]:
    tmp = tmp_path_factory.mktemp("console-replicas")
    pair = [
        Gateway(tmp=tmp, upstream_url=simulator.url, teams=TEAMS, users=USERS, store_url=redis_url, name=f"replica{n}")
        for n in (1, 2)
    ]
    for replica in pair:  # the same config: the same users and keys
        replica.start()
    yield pair
    for replica in pair:
        replica.stop()


def signed_in(replica: Gateway, credential: str) -> str:
    """A session made on `replica` by its sign-in form: the cookie's value."""
    with httpx.Client(base_url=replica.url, follow_redirects=False) as client:
        form = client.get("/console/sign-in")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert token, form.text
        answer = client.post("/console/sign-in", data={"csrf": token.group(1), "credential": credential})
        assert answer.status_code == 303, answer.text
        return str(client.cookies["tgw_console"])


def page(replica: Gateway, cookie: str, path: str = "/console/") -> httpx.Response:
    return httpx.get(replica.url + path, cookies={"tgw_console": cookie}, follow_redirects=False)


def test_a_session_made_on_one_replica_is_valid_on_the_other(replicas):
    one, two = replicas
    cookie = signed_in(one, one.user_keys["alice"])
    answer = page(two, cookie, "/console/team")
    assert answer.status_code == 200 and "alice · red" in answer.text
    token = re.search(r'name="csrf" value="([^"]+)"', answer.text)
    assert token
    out = httpx.post(
        two.url + "/console/sign-out", data={"csrf": token.group(1)}, cookies={"tgw_console": cookie}, timeout=10
    )
    assert out.status_code == 303
    assert page(one, cookie).status_code == 303  # signed out on the other replica: gone here too


def test_a_key_revoked_on_one_replica_ends_its_session_on_the_other_within_a_second(replicas):
    one, two = replicas
    issued = one.admin("POST", "/admin/users/bob/keys", json={"label": "replicas"}).json()
    cookie = signed_in(two, issued["key"])
    assert page(one, cookie).status_code == 200
    assert one.admin("DELETE", f"/admin/api-keys/{issued['id']}").status_code == 200
    revoked = time.monotonic()
    while page(two, cookie).status_code == 200:
        assert time.monotonic() - revoked < 1.0, "the session outlived its key by a second on the other replica"
        time.sleep(0.05)
