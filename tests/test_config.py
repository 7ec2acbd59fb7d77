import copy
import hashlib
from pathlib import Path

import orjson
import pytest

from gateway.config import ConfigError, load_settings, parse_settings
from gateway.settings import (
    Limits,
    PollerSettings,
    Secret,
    ServerSettings,
    StoreSettings,
    Team,
    UpstreamKey,
    UpstreamSettings,
    User,
)
from tests.doubles import FAST, MODEL

ALICE_KEY = "tgw-alice-test-key"
ALICE_SHA = hashlib.sha256(ALICE_KEY.encode()).hexdigest()
PRIMARY = "th-primary-0123456789abcd"
BACKUP = "th-backup-9876543210wxyz"
ENV = {
    "TOKENHUB_KEY_PRIMARY": PRIMARY,
    "GATEWAY_ADMIN_TOKEN": "admin-secret",
    "GATEWAY_METRICS_TOKEN": "metrics-secret",
}

# SPEC §6, verbatim but for the hash, plus a second key read from a file next to the config.
SPEC_TOML = f"""
[server]
host = "0.0.0.0"
port = 8080
admin_token_env = "GATEWAY_ADMIN_TOKEN"   # admin routes off when unset
metrics_token_env = "GATEWAY_METRICS_TOKEN" # optional: /metrics then needs this bearer token
shutdown_grace_s = 10
max_body_bytes = 67108864
log_prompts = false

[upstream]
base_url = "https://tokenhub.store/api/v1"
connect_timeout_s = 5
timeout_s = 60
cooldown_s = 30
breaker_failures = 5
breaker_open_s = 30

[[upstream.keys]]
name = "primary"
value_env = "TOKENHUB_KEY_PRIMARY"       # or value_file = "/run/secrets/primary"
weight = 1
max_concurrent_tasks = 10
models = ["doubao-seedance-2.0", "doubao-seedance-2.0-fast"]   # optional; default all

[[upstream.keys]]
name = "backup"
value_file = "secrets/backup"
weight = 3
max_concurrent_tasks = 4

[store]
url = "sqlite:////var/lib/tokenhub-gateway/gateway.db"

[poller]
interval_s = 15
expire_after_s = 172800

[pricing."doubao-seedance-2.0"]
"720p" = 0.20
"480p" = 0.12

[teams.marketing]
budget_usd = 500.0
video_seconds = 3000
period = "month"
requests_per_minute = 120
max_concurrent_tasks = 20
models = ["doubao-seedance-2.0-fast"]

[users.alice]
team = "marketing"
key_sha256 = "{ALICE_SHA}"
budget_usd = 50.0
requests_per_minute = 20
"""


@pytest.fixture
def spec_config(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "backup").write_text(BACKUP + "\n")
    path = tmp_path / "gateway.toml"
    path.write_text(SPEC_TOML)
    return path


def test_spec_example_parses_into_settings(spec_config):
    settings = load_settings(spec_config, env=ENV)
    assert settings.server == ServerSettings(
        host="0.0.0.0",
        port=8080,
        admin_token=Secret("admin-secret"),
        metrics_token=Secret("metrics-secret"),
        shutdown_grace_s=10,
        max_body_bytes=67108864,
        log_prompts=False,
    )
    assert settings.upstream == UpstreamSettings(
        base_url="https://tokenhub.store/api/v1",
        keys=(
            UpstreamKey("primary", Secret(PRIMARY), 1, 10, frozenset({MODEL, FAST})),
            UpstreamKey("backup", Secret(BACKUP), 3, 4, None),
        ),
        connect_timeout_s=5,
        timeout_s=60,
        cooldown_s=30,
        breaker_failures=5,
        breaker_open_s=30,
    )
    assert settings.store == StoreSettings(
        url=Secret("sqlite:////var/lib/tokenhub-gateway/gateway.db"), synchronous="NORMAL"
    )
    assert settings.poller == PollerSettings(interval_s=15, expire_after_s=172800, concurrency=32)
    assert settings.pricing == {MODEL: {"720p": 200_000, "480p": 120_000}, FAST: {"720p": 160_000, "480p": 100_000}}
    assert settings.teams == {
        "marketing": Team(
            "marketing",
            Limits(
                budget_micros=500_000_000,
                video_seconds=3000,
                period="month",
                requests_per_minute=120,
                max_concurrent_tasks=20,
                models=frozenset({FAST}),
            ),
        )
    }
    assert settings.users == {
        "alice": User(
            "alice", "marketing", ALICE_SHA, Limits(budget_micros=50_000_000, period="month", requests_per_minute=20)
        )
    }
    assert settings.source == str(spec_config)


def test_value_file_is_read_relative_to_the_config_not_the_cwd(spec_config, tmp_path, monkeypatch):
    monkeypatch.chdir(Path("/"))
    settings = load_settings(spec_config, env=ENV)
    assert settings.upstream.keys[1].value.reveal() == BACKUP


MINIMAL = {"upstream": {"base_url": "https://tokenhub.store/api/v1/", "keys": [{"name": "k", "value_env": "K"}]}}


def minimal(**sections):
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    return data


def test_minimal_config_takes_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = parse_settings(minimal(), env={"K": PRIMARY})
    assert settings.server == ServerSettings()
    assert settings.server.admin_token is None and settings.server.metrics_token is None
    assert settings.upstream.base_url == "https://tokenhub.store/api/v1"  # trailing slash dropped
    assert settings.upstream.keys == (UpstreamKey("k", Secret(PRIMARY)),)
    assert settings.upstream.keys[0].allows(MODEL) and settings.upstream.keys[0].allows("anything")
    upstream = settings.upstream
    assert (upstream.cooldown_s, upstream.breaker_failures, upstream.breaker_open_s) == (30, 5, 30)
    assert settings.store.url.reveal() == "sqlite:///" + str(tmp_path / "gateway.db")
    assert settings.poller == PollerSettings()
    assert settings.teams == {} and settings.users == {}


def test_user_period_defaults_to_its_team_period():
    data = minimal(
        teams={"ops": {"period": "week"}, "eng": {}},
        users={
            "bob": {"team": "ops", "key_sha256": "a" * 64},
            "carol": {"team": "ops", "key_sha256": "b" * 64, "period": "day"},
            "dan": {"team": "eng", "key_sha256": "c" * 64},
        },
    )
    settings = parse_settings(data, env={"K": PRIMARY})
    assert settings.teams["ops"].limits.period == "week" and settings.teams["eng"].limits.period == "month"
    assert {n: u.limits.period for n, u in settings.users.items()} == {"bob": "week", "carol": "day", "dan": "month"}


def test_store_url_from_env():
    data = minimal(store={"url_env": "STORE_URL"})
    settings = parse_settings(data, env={"K": PRIMARY, "STORE_URL": "redis://:pw@redis:6379/0"})
    assert settings.store.url.reveal() == "redis://:pw@redis:6379/0" and "pw" not in repr(settings.store)


# Every plain field, set to something other than its default, reaches its dataclass field.
NON_DEFAULTS = {
    "server": {
        "host": "127.0.0.1",
        "port": 9000,
        "shutdown_grace_s": 0,
        "max_body_bytes": 1024,
        "log_prompts": True,
        "header_timeout_s": 2.5,
        "body_timeout_s": 5,
    },
    "upstream": {"connect_timeout_s": 1.5, "timeout_s": 7, "cooldown_s": 2, "breaker_failures": 9, "breaker_open_s": 4},
    "poller": {"interval_s": 0.5, "expire_after_s": 60, "concurrency": 3},
    "openai": {"poll_after_ms": 500},
}


@pytest.mark.parametrize("section", sorted(NON_DEFAULTS))
def test_every_plain_setting_reaches_its_field(section):
    values = NON_DEFAULTS[section]
    extra = MINIMAL["upstream"] if section == "upstream" else {}
    settings = parse_settings(minimal(**{section: {**extra, **values}}), env={"K": PRIMARY})
    assert {k: getattr(getattr(settings, section), k) for k in values} == values


def test_store_and_key_fields_override_their_defaults():
    settings = parse_settings(
        minimal(
            upstream={
                **MINIMAL["upstream"],
                "keys": [{"name": "k", "value_env": "K", "weight": 4, "max_concurrent_tasks": 2}],
            },
            store={"url": "redis://redis:6379/2", "synchronous": "full"},
        ),
        env={"K": PRIMARY},
    )
    assert settings.upstream.keys == (UpstreamKey("k", Secret(PRIMARY), weight=4, max_concurrent_tasks=2),)
    assert settings.store == StoreSettings(url=Secret("redis://redis:6379/2"), synchronous="FULL")


def test_an_unset_team_period_is_the_limits_default_and_a_user_takes_its_teams():
    data = minimal(teams={"t": {"budget_usd": 1}}, users={"u": {"team": "t", "key_sha256": "a" * 64}})
    settings = parse_settings(data, env={"K": PRIMARY})
    assert settings.teams["t"].limits == Limits(budget_micros=1_000_000)
    assert settings.users["u"].limits == Limits(period=Limits().period)


def test_slow_client_timeouts_and_the_openai_shape_have_defaults():
    settings = parse_settings(minimal(), env={"K": PRIMARY})
    assert (settings.server.header_timeout_s, settings.server.body_timeout_s) == (10, 30)
    assert settings.openai.poll_after_ms == 2000
    assert dict(settings.openai.model_aliases) == {"sora-2": FAST, "sora-2-pro": MODEL}


def test_model_aliases_are_merged_over_the_defaults_and_read_only(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[upstream]\nbase_url = "https://x"\n[[upstream.keys]]\nname = "k"\nvalue_env = "K"\n'
        '[pricing.seedance-lite]\n"480p" = 0.05\n'
        "[openai]\npoll_after_ms = 1000\n"
        '[openai.model_aliases]\n"sora-2" = "doubao-seedance-2.0"\nlite = "seedance-lite"\n'
    )
    settings = load_settings(path, env={"K": PRIMARY})
    assert settings.openai.poll_after_ms == 1000
    assert dict(settings.openai.model_aliases) == {"sora-2": MODEL, "sora-2-pro": MODEL, "lite": "seedance-lite"}
    with pytest.raises(TypeError):
        settings.openai.model_aliases["veo"] = MODEL  # type: ignore[index]
    assert dict(parse_settings(minimal(), env={"K": PRIMARY}).openai.model_aliases) == {
        "sora-2": FAST,
        "sora-2-pro": MODEL,
    }


@pytest.mark.parametrize(
    "data, location",
    [
        (minimal(server={"header_timeout_s": 0}), "server.header_timeout_s"),
        (minimal(server={"body_timeout_s": -1}), "server.body_timeout_s"),
        (minimal(server={"body_timeout_s": "30"}), "server.body_timeout_s"),
        (minimal(openai={"poll_after_ms": 0}), "openai.poll_after_ms"),
        (minimal(openai={"poll_after_ms": 1.5}), "openai.poll_after_ms"),
        (minimal(openai={"poll_ms": 1}), "openai.poll_ms"),
        (minimal(openai=5), "openai"),
        (minimal(openai={"model_aliases": ["sora-2"]}), "openai.model_aliases"),
        (minimal(openai={"model_aliases": {"veo": "veo-3"}}), 'openai.model_aliases."veo"'),
        (minimal(openai={"model_aliases": {"sora-2": "doubao-seedance-1.0"}}), 'openai.model_aliases."sora-2"'),
        (minimal(openai={"model_aliases": {"veo": [MODEL]}}), 'openai.model_aliases."veo"'),
        (minimal(openai={"model_aliases": {FAST: MODEL}}), f'openai.model_aliases."{FAST}"'),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_new_setting_problems(data, location):
    problems = problems_of(data)
    assert any(p.startswith(location + ": ") for p in problems), problems


def test_pricing_override_adds_a_model_and_keeps_the_defaults():
    settings = parse_settings(
        minimal(pricing={"seedance-lite": {"1080p": 0.3}, FAST: {"720p": 0.15}}), env={"K": PRIMARY}
    )
    assert settings.pricing["seedance-lite"] == {"1080p": 300_000}
    assert settings.pricing[FAST] == {"720p": 150_000}
    assert settings.pricing[MODEL] == {"720p": 200_000, "480p": 120_000}


@pytest.mark.parametrize("price", [1e300, float("inf"), float("nan"), -0.01, 1000.01, True])
def test_a_price_with_no_exact_micro_dollars_is_a_problem_not_a_crash(price):
    problems = problems_of(minimal(pricing={MODEL: {"720p": price}}))
    assert len(problems) == 1 and problems[0].startswith(f'pricing."{MODEL}"."720p": expected dollars per second')
    assert parse_settings(minimal(pricing={MODEL: {"720p": 1000}}), env={"K": PRIMARY}).pricing[MODEL]["720p"] == (
        1_000_000_000
    )


# --- every problem, with its location ---------------------------------------------------------

INLINE = "th-inline-SHOULD-NEVER-BE-SHOWN"
MANY_MISTAKES = {
    "servre": {},  # typo of a section
    "server": {"port": "8080", "log_prompts": "yes"},
    "upstream": {
        "base_url": "ftp://tokenhub.store",
        "cooldown_s": -1,
        "keys": [
            {"name": "a", "value_env": "NOT_SET"},
            {"name": "b", "value": INLINE},
            {"name": "c", "value_env": "K", "models": ["sora-2"]},
        ],
    },
    "store": {"url": "postgres://db/gateway"},
    "poller": {"interval_s": 0},
    "pricing": {MODEL: {"720p": "cheap"}},
    "teams": {"marketing": {"period": "year", "budget_usd": -5}},
    "users": {
        "alice": {"team": "sales", "key_sha256": ALICE_SHA},
        "bob": {"team": "marketing", "key_sha256": "ABC"},
        "carol": {"key_sha256": "d" * 64},
    },
}
LOCATIONS = [
    "servre",
    "server.port",
    "server.log_prompts",
    "upstream.base_url",
    "upstream.cooldown_s",
    "upstream.keys[0].value_env",
    "upstream.keys[1].value",
    "upstream.keys[2].models",
    "store.url",
    "poller.interval_s",
    'pricing."doubao-seedance-2.0"."720p"',
    "teams.marketing.period",
    "teams.marketing.budget_usd",
    "users.alice.team",
    "users.bob.key_sha256",
    "users.carol.team",
]


def problems_of(data, env=None, base_dir=None):
    with pytest.raises(ConfigError) as info:
        parse_settings(data, env={"K": PRIMARY} if env is None else env, base_dir=base_dir)
    return info.value.problems


@pytest.mark.parametrize("location", LOCATIONS)
def test_every_problem_is_reported_at_once_with_its_location(location):
    problems = problems_of(MANY_MISTAKES)
    assert any(p.startswith(location + ": ") for p in problems), problems


def test_problems_are_all_in_the_error_message():
    with pytest.raises(ConfigError) as info:
        parse_settings(MANY_MISTAKES, env={"K": PRIMARY})
    assert len(info.value.problems) >= len(LOCATIONS)
    assert str(info.value) == "\n".join(info.value.problems)


@pytest.mark.parametrize(
    "data, location",
    [
        ({**MINIMAL, "extra": 1}, "extra"),
        (minimal(server={"hots": "x"}), "server.hots"),
        (minimal(upstream={**MINIMAL["upstream"], "retries": 3}), "upstream.retries"),
        (
            minimal(upstream={**MINIMAL["upstream"], "keys": [{"name": "k", "value_env": "K", "wieght": 2}]}),
            "upstream.keys[0].wieght",
        ),
        (minimal(store={"path": "/tmp/x.db"}), "store.path"),
        (minimal(poller={"every_s": 3}), "poller.every_s"),
        (minimal(teams={"ops": {"budget": 3}}), "teams.ops.budget"),
        (minimal(teams={"ops": {}}, users={"al": {"team": "ops", "key_sha256": "a" * 64, "key": "x"}}), "users.al.key"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unknown_keys_are_errors(data, location):
    assert f"{location}: unknown setting" in problems_of(data)


def test_key_value_inline_in_toml_is_refused_and_never_echoed():
    data = minimal(upstream={**MINIMAL["upstream"], "keys": [{"name": "k", "value": INLINE}]})
    with pytest.raises(ConfigError) as info:
        parse_settings(data, env={})
    assert any(p.startswith("upstream.keys[0].value: ") and "value_env or value_file" in p for p in info.value.problems)
    assert INLINE not in str(info.value) and INLINE not in repr(info.value)


@pytest.mark.parametrize(
    "data, location",
    [
        ({"upstream": {"keys": [{"name": "k", "value_env": "K"}]}}, "upstream.base_url"),
        ({"upstream": {"base_url": "https://x"}}, "upstream.keys"),
        ({"upstream": {"base_url": "https://x", "keys": []}}, "upstream.keys"),
        (minimal(upstream={"base_url": "https://x", "keys": [{"value_env": "K"}]}), "upstream.keys[0].name"),
        (minimal(upstream={"base_url": "https://x", "keys": [{"name": "k"}]}), "upstream.keys[0]"),
        (
            minimal(upstream={"base_url": "https://x", "keys": [{"name": "k", "value_env": "K", "value_file": "f"}]}),
            "upstream.keys[0]",
        ),
        (
            minimal(upstream={"base_url": "https://x", "keys": [{"name": "k", "value_file": "no/such"}]}),
            "upstream.keys[0].value_file",
        ),
        (
            minimal(
                upstream={
                    "base_url": "https://x",
                    "keys": [{"name": "k", "value_env": "K"}, {"name": "k", "value_env": "K"}],
                }
            ),
            "upstream.keys",
        ),
        (
            minimal(upstream={"base_url": "https://x", "keys": [{"name": "k", "value_env": "K", "weight": 0}]}),
            "upstream.keys[0].weight",
        ),
        (minimal(store={"url_env": "NOPE"}), "store.url_env"),
        (minimal(store={"synchronous": "OFF"}), "store.synchronous"),
        (minimal(teams={"t": {"models": ["sora-2"]}}), "teams.t.models"),
        (minimal(teams={"t": {"requests_per_minute": 0}}), "teams.t.requests_per_minute"),
        (minimal(teams={"t": {"video_seconds": 1.5}}), "teams.t.video_seconds"),
        (minimal(teams={"t": 5}), "teams.t"),
        (minimal(teams={"t": {}}, users={"u": {"team": "t"}}), "users.u.key_sha256"),
        (
            minimal(
                teams={"t": {}},
                users={"u": {"team": "t", "key_sha256": "a" * 64}, "v": {"team": "t", "key_sha256": "a" * 64}},
            ),
            "users.v.key_sha256",
        ),
        (minimal(server=5), "server"),
    ],
)
def test_single_problems(data, location, tmp_path):
    problems = problems_of(data, base_dir=tmp_path)
    assert any(p.startswith(location + ": ") for p in problems), problems


@pytest.mark.parametrize("section", ["pricing", "teams", "users"])
def test_non_table_section_is_a_problem_not_a_crash(section):
    assert any(p.startswith(section + ": ") for p in problems_of(minimal(**{section: 5})))


def test_empty_value_file_is_a_problem(tmp_path):
    (tmp_path / "empty").write_text("\n")
    data = minimal(upstream={"base_url": "https://x", "keys": [{"name": "k", "value_file": "empty"}]})
    assert any(p.startswith("upstream.keys[0].value_file: ") for p in problems_of(data, base_dir=tmp_path))


def test_key_field_problems_are_reported_even_when_its_value_is_missing():
    data = minimal(
        upstream={
            "base_url": "https://x",
            "keys": [{"name": "k", "value_env": "NOT_SET", "weight": 0, "max_concurrent_tasks": -1}],
        }
    )
    problems = problems_of(data)
    for location in ("upstream.keys[0].value_env", "upstream.keys[0].weight", "upstream.keys[0].max_concurrent_tasks"):
        assert any(p.startswith(location + ": ") for p in problems), problems


def test_load_settings_reports_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "missing.toml", env={})
    assert "missing.toml: cannot read" in info.value.problems[0]
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(bad, env={})
    assert "bad.toml: not valid TOML" in info.value.problems[0]


# --- secrets: never in a problem, cleaned when read ------------------------------------------

LEAKY = "th-leaky-0123456789.+/=abcd"
TOKEN_LIKE = "ghp_AbCdEf0123456789XyZ"  # a valid identifier, yet a token


def keyed(**key):
    return minimal(upstream={"base_url": "https://x", "keys": [{"name": "k", **key}]})


@pytest.mark.parametrize(
    "data, location, secret",
    [
        (keyed(value_env=LEAKY), "upstream.keys[0].value_env", LEAKY),
        (keyed(value_env=TOKEN_LIKE), "upstream.keys[0].value_env", TOKEN_LIKE),
        (keyed(value_env=[LEAKY]), "upstream.keys[0].value_env", LEAKY),
        (keyed(value_file=LEAKY), "upstream.keys[0].value_file", LEAKY),
        (keyed(value_file=f"/no/such/{LEAKY}"), "upstream.keys[0].value_file", LEAKY),
        (minimal(store={"url_env": "redis://:hunter2pw@redis:6379/0"}), "store.url_env", "hunter2pw"),
        (minimal(store={"url": "postgres://gw:hunter2pw@db/gateway"}), "store.url", "hunter2pw"),
        (minimal(store={"url": 12345678}), "store.url", "12345678"),
        (minimal(server={"admin_token_env": "adm-token-hunter2pw"}), "server.admin_token_env", "hunter2pw"),
        (minimal(server={"metrics_token_env": "metrics hunter2pw"}), "server.metrics_token_env", "hunter2pw"),
        (minimal(server={"admin_token_env": 987654321}), "server.admin_token_env", "987654321"),
        (
            minimal(upstream={**MINIMAL["upstream"], "base_url": "ftp://gw:hunter2pw@tokenhub"}),
            "upstream.base_url",
            "hunter2pw",
        ),
        (minimal(teams={"t": {"models": [LEAKY]}}), "teams.t.models", LEAKY),
        (minimal(teams={"t": {"period": LEAKY}}), "teams.t.period", LEAKY),
        (minimal(teams={"t": {}}, users={"u": {"team": LEAKY, "key_sha256": "a" * 64}}), "users.u.team", LEAKY),
        (
            minimal(teams={"t": {}}, users={"u": {"team": "t", "key_sha256": ALICE_KEY}}),
            "users.u.key_sha256",
            ALICE_KEY,
        ),  # the key pasted where its hash belongs
        (minimal(server={"host": [LEAKY]}), "server.host", LEAKY),
        (minimal(pricing={MODEL: {"720p": LEAKY}}), f'pricing."{MODEL}"."720p"', LEAKY),
        (
            minimal(
                upstream={
                    "base_url": "https://x",
                    "keys": [{"name": LEAKY, "value_env": "K"}, {"name": LEAKY, "value_env": "K"}],
                }
            ),
            "upstream.keys",
            LEAKY,
        ),
    ],
    ids=lambda v: (
        v if isinstance(v, str) and v.startswith(("upstream", "store", "server", "teams", "users", "pricing")) else ""
    ),
)
def test_a_problem_names_the_setting_never_a_value_that_could_be_a_secret(data, location, secret, tmp_path):
    problems = problems_of(data, base_dir=tmp_path)
    assert any(p.startswith(location + ": ") for p in problems), problems
    assert not any(secret in p or secret[:12] in p for p in problems), problems


@pytest.mark.parametrize(
    "name, shown",
    [
        ("TOKENHUB_KEY_PRIMARY", True),
        ("K", True),
        ("lower_case", False),
        (TOKEN_LIKE, False),
        ("AKIAIOSFODNN7EXAMPLE", False),
    ],
)
def test_an_unset_variable_is_named_only_in_a_variables_usual_shape(name, shown):
    problems = problems_of(keyed(value_env=name), env={})
    assert problems[0].startswith("upstream.keys[0].value_env: ") and "not set" in problems[0]
    assert (name in problems[0]) is shown


def test_a_config_file_full_of_misplaced_secrets_loads_into_problems_without_them(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
[server]
admin_token_env = "adm-hunter2pw"
[upstream]
base_url = "gopher://gw:hunter2pw@tokenhub"
[[upstream.keys]]
name = "primary"
value_env = "{LEAKY}"
[[upstream.keys]]
name = "backup"
value_file = "{LEAKY}"
[store]
url_env = "rediss://:hunter2pw@redis:6380/0"
""")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    text = str(info.value) + repr(info.value)
    assert "hunter2pw" not in text and LEAKY not in text and LEAKY[:12] not in text
    for location in (
        "server.admin_token_env",
        "upstream.base_url",
        "upstream.keys[0].value_env",
        "upstream.keys[1].value_file",
        "store.url_env",
    ):
        assert location + ": " in text, text


@pytest.mark.parametrize("raw", [PRIMARY + "\n", PRIMARY + "\r\n", f"  {PRIMARY}\t", f"\n{PRIMARY}\n\n"])
def test_secret_values_are_stripped_of_surrounding_white_space(raw, tmp_path):
    (tmp_path / "key").write_text(raw, newline="")
    data = minimal(
        upstream={
            "base_url": "https://x",
            "keys": [{"name": "e", "value_env": "K"}, {"name": "f", "value_file": "key"}],
        },
        server={"admin_token_env": "ADMIN"},
        store={"url_env": "STORE"},
    )
    settings = parse_settings(
        data, env={"K": raw, "ADMIN": raw, "STORE": f" redis://r:6379/0{raw[-1]}"}, base_dir=tmp_path
    )
    assert [k.value.reveal() for k in settings.upstream.keys] == [PRIMARY, PRIMARY]
    assert settings.server.admin_token == Secret(PRIMARY) and settings.store.url.reveal() == "redis://r:6379/0"


@pytest.mark.parametrize(
    "value",
    [
        "th-abc\x07def-0123456789",
        "th-abc\x00def",
        "th-abc\ndef",
        "\ufeffth-0123456789abcd",
        "th-abc\u200bdef",
        "th-abc\x7fdef",
    ],
)
def test_a_secret_holding_a_control_character_is_a_problem_at_its_location(value, tmp_path):
    (tmp_path / "key").write_text(value)
    data = minimal(
        upstream={
            "base_url": "https://x",
            "keys": [{"name": "e", "value_env": "K"}, {"name": "f", "value_file": "key"}],
        },
        server={"metrics_token_env": "METRICS"},
    )
    problems = problems_of(data, env={"K": value, "METRICS": value}, base_dir=tmp_path)
    for location in ("upstream.keys[0].value_env", "upstream.keys[1].value_file", "server.metrics_token_env"):
        assert any(p.startswith(location + ": ") and "control character" in p for p in problems), problems
    assert not any("abc" in p or "0123" in p for p in problems), problems


def test_a_variable_or_file_holding_only_white_space_is_empty(tmp_path):
    (tmp_path / "blank").write_text(" \n\t\n")
    data = minimal(
        upstream={
            "base_url": "https://x",
            "keys": [{"name": "e", "value_env": "K"}, {"name": "f", "value_file": "blank"}],
        },
        server={"admin_token_env": "ADMIN"},
    )
    problems = problems_of(data, env={"K": "\n", "ADMIN": " "}, base_dir=tmp_path)
    assert problems == [
        "upstream.keys[0].value_env: environment variable K is empty",
        "upstream.keys[1].value_file: the file it names is empty",
    ]
    assert (
        parse_settings(
            minimal(server={"admin_token_env": "ADMIN"}), env={"K": PRIMARY, "ADMIN": " "}
        ).server.admin_token
        is None
    )  # blank = admin off


def test_a_key_file_that_is_not_text_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "key").write_bytes(b"th-\xff\xfe-0123456789")
    assert any(
        p.startswith("upstream.keys[0].value_file: ") for p in problems_of(keyed(value_file="key"), base_dir=tmp_path)
    )


# --- Secret --------------------------------------------------------------------------------


def test_secret_never_shows_its_value():
    secret = Secret(PRIMARY)
    key = UpstreamKey("primary", secret)
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        format(secret),
        repr(key),
        str(key),
        repr([secret]),
        repr({"k": secret}),
    ]
    assert all(PRIMARY not in text and "0123456789abcd" not in text for text in shown)
    assert secret.reveal() == PRIMARY


def test_secret_never_shows_its_value_through_any_formatting():
    secret = Secret(PRIMARY)
    texts = [
        f"{secret=}",
        str((secret,)),
        str({"k": secret}),
        orjson.dumps({"k": secret}, default=str).decode(),
        repr(UpstreamSettings("https://x", (UpstreamKey("k", secret),))),
        repr(StoreSettings(url=secret)),
        repr(ServerSettings(admin_token=secret, metrics_token=secret)),
    ]
    assert all(PRIMARY not in t and "0123456789abcd" not in t for t in texts), texts
    with pytest.raises(TypeError):
        f"{secret:>40}"  # a format spec is refused rather than applied to the value
    assert not hasattr(secret, "__dict__")


def test_settings_repr_hides_every_secret(spec_config):
    text = repr(load_settings(spec_config, env=ENV))
    for secret in (PRIMARY, BACKUP, "admin-secret", "metrics-secret"):
        assert secret not in text


@pytest.mark.parametrize(
    "value, masked",
    [
        ("th-abcdefgh12345678abcd", "th-…abcd"),
        (PRIMARY, "th-…abcd"),
        ("tgw-0123456789wxyz", "tgw-…wxyz"),
        ("sk0123456789abcd", "…abcd"),
        ("th-short", "…"),
        ("", "…"),
    ],
)
def test_secret_masked(value, masked):
    assert Secret(value).masked() == masked


def test_secret_equality_and_hash():
    assert Secret("x") == Secret("x") and Secret("x") != Secret("y") and Secret("x") != "x"
    assert len({Secret("x"), Secret("x")}) == 1


# --- the poller's polls per second and the ledger's retention ----------------------------------


def test_the_poller_polls_50_a_second_per_key_and_the_ledger_keeps_everything_unless_told():
    settings = parse_settings(minimal(), env={"K": PRIMARY})
    assert settings.poller.max_polls_per_second == 50
    assert settings.ledger.retention_days is None


def test_poller_rate_and_ledger_retention_reach_their_fields():
    data = minimal(poller={"max_polls_per_second": 12.5}, ledger={"retention_days": 400})
    settings = parse_settings(data, env={"K": PRIMARY})
    assert (settings.poller.max_polls_per_second, settings.ledger.retention_days) == (12.5, 400)


@pytest.mark.parametrize(
    "sections, problem",
    [
        ({"poller": {"max_polls_per_second": 0}}, "poller.max_polls_per_second: expected a positive number, got 0"),
        ({"poller": {"max_polls_per_second": "fast"}}, "poller.max_polls_per_second: expected a positive number"),
        ({"ledger": {"retention_days": 0}}, "ledger.retention_days: expected a positive integer, got 0"),
        ({"ledger": {"retention_days": -30}}, "ledger.retention_days: expected a positive integer, got -30"),
        ({"ledger": {"retention_days": 1.5}}, "ledger.retention_days: expected a positive integer, got 1.5"),
        ({"ledger": {"retention_days": True}}, "ledger.retention_days: expected a positive integer"),
        ({"ledger": {"keep_days": 3}}, "ledger.keep_days: unknown setting"),
        ({"ledger": 365}, "ledger: expected a table"),
    ],
    ids=lambda v: "" if isinstance(v, dict) else v.split(":")[0],
)
def test_a_bad_rate_or_retention_is_reported_with_its_location(sections, problem):
    assert any(p.startswith(problem) for p in problems_of(minimal(**sections))), problem


def test_a_bad_retention_is_reported_with_every_other_problem():
    problems = problems_of({**MANY_MISTAKES, "ledger": {"retention_days": "forever"}})
    assert any(p.startswith("ledger.retention_days: ") for p in problems)
    assert all(any(p.startswith(where + ": ") for p in problems) for where in LOCATIONS)


@pytest.mark.parametrize("retention, said", [(None, "kept for ever"), (90, "deleted after 90 days")])
def test_check_config_says_how_long_the_ledger_keeps_settled_tasks(tmp_path, monkeypatch, capsys, retention, said):
    from gateway.cli import parser

    config = tmp_path / "gateway.toml"
    upstream = '[upstream]\nbase_url = "https://t.example/api/v1"\n[[upstream.keys]]\nname = "k"\nvalue_env = "K"\n'
    config.write_text(upstream + (f"[ledger]\nretention_days = {retention}\n" if retention else ""))
    monkeypatch.setenv("K", PRIMARY)
    args = parser().parse_args(["check-config", "--config", str(config)])
    assert args.func(args) == 0
    assert f"ledger.retention_days: settled tasks {said}" in capsys.readouterr().out
