import hashlib
from dataclasses import replace

import pytest

from gateway.errors import AuthError
from gateway.policy.auth import Authenticator, key_sha256, new_key
from gateway.settings import Settings
from tests.doubles import make_settings

ALICE_KEY = new_key()
BOB_KEY = new_key()
OTHER_KEY = new_key()


def settings() -> Settings:
    return make_settings(
        teams={"marketing": {"budget_usd": 500.0}, "research": {}},
        users={"alice": {"team": "marketing", "key": ALICE_KEY}, "bob": {"team": "research", "key": BOB_KEY}},
    )


@pytest.fixture(scope="module")
def auth():
    return Authenticator(settings())


@pytest.mark.parametrize(
    "header, user, team",
    [
        (f"Bearer {ALICE_KEY}", "alice", "marketing"),
        (f"bearer {ALICE_KEY}", "alice", "marketing"),  # the scheme is case-insensitive
        (f"Bearer {ALICE_KEY} ", "alice", "marketing"),
        (f"Bearer {BOB_KEY}", "bob", "research"),
    ],
)
def test_right_key_gives_user_and_team(auth, header, user, team):
    found_user, found_team = auth.authenticate(header)
    assert (found_user.name, found_user.team, found_team.name) == (user, team, team)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {OTHER_KEY}",
        f"Bearer {ALICE_KEY[:-1]}",
        f"Bearer {ALICE_KEY.upper()}",
        f"Basic {ALICE_KEY}",
        f"Token {ALICE_KEY}",
        ALICE_KEY,
        f"Bearer {key_sha256(ALICE_KEY)}",  # the stored hash is not a key
    ],
    ids=[
        "none",
        "empty",
        "scheme only",
        "scheme and space",
        "unknown key",
        "truncated key",
        "wrong case",
        "basic scheme",
        "token scheme",
        "no scheme",
        "hash as key",
    ],
)
def test_bad_credentials_are_401_invalid_api_key(auth, header):
    with pytest.raises(AuthError) as info:
        auth.authenticate(header)
    err = info.value
    assert (err.status, err.type, err.code) == (401, "authentication_error", "invalid_api_key")
    assert ALICE_KEY not in err.message and OTHER_KEY not in err.message


def test_new_key_shape():
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("tgw-") and len(k) >= 4 + 40 for k in keys)


@pytest.mark.parametrize("key", [ALICE_KEY, "tgw-abc", ""])
def test_key_sha256_is_lowercase_hex_of_the_whole_key(key):
    digest = key_sha256(key)
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert len(digest) == 64 and digest == digest.lower()


def test_a_reload_without_the_user_invalidates_the_key():
    configured = settings()
    reloaded = Authenticator(replace(configured, users={n: u for n, u in configured.users.items() if n != "alice"}))
    with pytest.raises(AuthError):
        reloaded.authenticate(f"Bearer {ALICE_KEY}")
    assert reloaded.authenticate(f"Bearer {BOB_KEY}")[0].name == "bob"
