"""The console's session rules, without HTTP: CSRF tokens tied to a session, what a session stands on (a live
key, the same admin token, a single sign-on user with its e-mail), and which peers are believed."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_network

import httpx
import pytest
from starlette.requests import Request
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.console import sessions
from gateway.console.sessions import KEY, OPERATOR_TOKEN, SSO, csrf_ok, csrf_token, digest, identity, sso_user
from gateway.policy.directory import Directory
from gateway.settings import Secret
from gateway.store.sessions import ConsoleSession
from gateway.tenancy import ApiKey, Roster, RosterChanges, TeamRecord, UserRecord, issue_key
from tests.doubles import USER_KEY, FakeClock, FakeUpstream, make_settings

NOW = 1_750_000_000.0
TOKEN = Secret("adm-console-unit-token")


def test_a_csrf_token_belongs_to_its_secret_alone():
    one, two = sessions.new_secret(), sessions.new_secret()
    assert one != two and len(one) >= 40
    assert csrf_token(one) == csrf_token(one) != csrf_token(two)
    assert csrf_ok(one, csrf_token(one))
    assert not csrf_ok(one, csrf_token(two))
    assert not csrf_ok(one, "") and not csrf_ok(one, None) and not csrf_ok(None, csrf_token(one))
    assert one not in csrf_token(one)  # the token does not give the session id away


def directory_with_api_key(expires_at: float | None = None) -> tuple[Directory, str, ApiKey]:
    """A directory of the config's alice (team red) and the store's dora (team blue, team admin), holding one
    key issued to dora: its value and record."""
    settings = make_settings(
        teams={"red": {}}, users={"alice": {"team": "red", "key": USER_KEY, "email": "Alice@Example.com"}}
    )
    directory = Directory(settings)
    value, key = issue_key("dora", "blue", NOW - 10, expires_at=expires_at)
    roster = Roster(1, (TeamRecord("blue"),), (UserRecord("dora", "blue", "team_admin", "dora@example.com"),), (key,))
    directory.load(roster)
    return directory, value, key


def session(kind: str, subject: str) -> ConsoleSession:
    return ConsoleSession(digest("some-session-id"), kind, subject, NOW - 60, NOW + 3600)


def test_a_key_session_stands_while_its_key_is_live():
    directory, value, _ = directory_with_api_key()
    assert identity(session(KEY, digest(value)), directory, TOKEN, NOW) == ("team_admin", "dora", "blue")
    assert identity(session(KEY, digest(USER_KEY)), directory, TOKEN, NOW) == ("member", "alice", "red")
    assert identity(session(KEY, digest("tgw-no-such-key")), directory, TOKEN, NOW) is None


def test_a_key_session_ends_with_its_key_revoked_expired_or_its_user_gone():
    directory, value, key = directory_with_api_key(expires_at=NOW + 100)
    assert identity(session(KEY, digest(value)), directory, TOKEN, NOW + 99) is not None
    assert identity(session(KEY, digest(value)), directory, TOKEN, NOW + 100) is None  # expired from that second
    directory.apply(RosterChanges(2, keys=(replace(key, revoked_at=NOW),)))
    assert identity(session(KEY, digest(value)), directory, TOKEN, NOW) is None
    other, value, _ = directory_with_api_key()
    other.apply(RosterChanges(2, deleted_users=("dora",)))
    assert identity(session(KEY, digest(value)), other, TOKEN, NOW) is None


def test_an_operator_session_ends_when_the_token_changes_or_goes():
    directory, _, _ = directory_with_api_key()
    signed = session(OPERATOR_TOKEN, digest(TOKEN.reveal()))
    assert identity(signed, directory, TOKEN, NOW) == ("operator", "", "")
    assert identity(signed, directory, Secret("a-new-token"), NOW) is None
    assert identity(signed, directory, None, NOW) is None


def test_a_single_sign_on_session_needs_its_user_and_an_email():
    directory, _, _ = directory_with_api_key()
    assert identity(session(SSO, "dora"), directory, TOKEN, NOW) == ("team_admin", "dora", "blue")
    assert identity(session(SSO, "nobody"), directory, TOKEN, NOW) is None
    directory.apply(RosterChanges(2, users=(UserRecord("dora", "blue", "team_admin", None),)))
    assert identity(session(SSO, "dora"), directory, TOKEN, NOW) is None
    assert identity(session("something-else", "dora"), directory, TOKEN, NOW) is None


def test_an_email_names_its_user_whatever_its_case():
    directory, _, _ = directory_with_api_key()
    assert sso_user(directory, "alice@example.com") == "alice"
    assert sso_user(directory, " DORA@example.com ") == "dora"
    assert sso_user(directory, "eve@example.com") is None


@pytest.mark.parametrize(
    ("email", "twins"),
    [
        ("alice@example.com", ("ALICE@example.com",)),  # the config's alice and a store user of another team
        ("dora@example.com", ("Dora@Example.COM",)),  # two store users (rows older than the unique rule)
        ("alice@example.com", ("alice@example.com", "alice@EXAMPLE.com")),
    ],
)
def test_an_email_several_users_have_names_none_of_them_and_says_how_many(email, twins):
    directory, _, _ = directory_with_api_key()
    users = tuple(UserRecord(f"twin{n}", "blue", "member", twin) for n, twin in enumerate(twins))
    directory.apply(RosterChanges(2, users=users))
    with capture_logs() as logs:
        assert sso_user(directory, email) is None
        assert sso_user(directory, f" {email.upper()} ") is None
    warned = [entry for entry in logs if entry["event"] == "console.sso_ambiguous"]
    assert [(entry["log_level"], entry["users"]) for entry in warned] == [("warning", len(twins) + 1)] * 2
    assert "example.com" not in repr(logs).lower()  # the count, never the addresses


def test_an_email_no_longer_shared_names_its_user_again():
    directory, _, _ = directory_with_api_key()
    directory.apply(RosterChanges(2, users=(UserRecord("dave", "blue", "member", "alice@example.com"),)))
    assert sso_user(directory, "alice@example.com") is None
    directory.apply(RosterChanges(3, users=(UserRecord("dave", "blue", "member", "dave@example.com"),)))
    assert sso_user(directory, "alice@example.com") == "alice"
    assert sso_user(directory, "dave@example.com") == "dave"


async def test_a_sign_on_with_a_shared_email_opens_no_session_and_gets_the_failure_page(tmp_path):
    settings = make_settings(
        f"sqlite:///{tmp_path / 'sso.db'}",
        server={"console_trusted_header": "X-Forwarded-Email", "console_trusted_proxies": ["10.0.0.0/8"]},
        teams={"red": {}, "blue": {}},
        users={
            "alice": {"team": "red", "key": USER_KEY, "email": "alice@example.com"},
            "bob": {"team": "red", "key": "tgw-console-unit-bob", "email": "bob@example.com"},
        },
    )
    app = create_app(settings, upstream=FakeUpstream(), clock=FakeClock(NOW), run_poller=False)
    async with app.router.lifespan_context(app):
        directory = app.gateway.directory  # a store user with alice's e-mail, of another team
        directory.apply(
            RosterChanges(directory.version, users=(UserRecord("mallory", "blue", "member", "Alice@Example.com"),))
        )
        transport = httpx.ASGITransport(app=app, client=("10.0.0.5", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as proxy:
            shared = await proxy.get("/console/", headers={"X-Forwarded-Email": "alice@example.com"})
            unknown = await proxy.get("/console/", headers={"X-Forwarded-Email": "nobody@example.com"})
            single = await proxy.get("/console/", headers={"X-Forwarded-Email": "bob@example.com"})
    assert shared.status_code == unknown.status_code == 401
    assert "set-cookie" not in shared.headers and shared.text == unknown.text
    assert single.status_code == 200 and "bob · red" in single.text  # an e-mail of one user still signs in


def request(peer: str, headers: dict[str, str], scheme: str = "http") -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    return Request(
        {
            "type": "http",
            "method": "GET",
            "scheme": scheme,
            "path": "/console/",
            "query_string": b"",
            "headers": raw,
            "client": (peer, 50000),
            "server": ("gw", 80),
        }
    )


PROXIES = (ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    ("peer", "headers", "address", "https"),
    [
        ("10.1.2.3", {"X-Forwarded-For": "1.1.1.1, 203.0.113.9", "X-Forwarded-Proto": "https"}, "203.0.113.9", True),
        ("192.0.2.7", {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}, "192.0.2.7", False),
        ("10.1.2.3", {}, "10.1.2.3", False),
        ("not-an-address", {"X-Forwarded-For": "203.0.113.9"}, "not-an-address", False),
    ],
)
def test_forwarded_headers_count_only_from_trusted_proxies(peer, headers, address, https):
    asked = request(peer, headers)
    assert sessions.client_address(asked, PROXIES) == address
    assert sessions.over_https(asked, PROXIES) is https
    assert sessions.over_https(request(peer, {}, scheme="https"), PROXIES)


def test_the_sign_on_header_is_read_from_trusted_proxies_only():
    server = make_settings(
        server={"console_trusted_header": "X-Forwarded-Email", "console_trusted_proxies": ["10.0.0.0/8"]}
    ).server
    assert sessions.sso_email(request("10.9.9.9", {"X-Forwarded-Email": "a@b.co"}), server) == "a@b.co"
    assert sessions.sso_email(request("192.0.2.1", {"X-Forwarded-Email": "a@b.co"}), server) is None
    assert sessions.sso_email(request("10.9.9.9", {}), server) is None
    assert sessions.sso_email(request("10.9.9.9", {"X-Forwarded-Email": "a@b.co"}), make_settings().server) is None
