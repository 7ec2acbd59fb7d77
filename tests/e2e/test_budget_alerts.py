"""Budget alerts end to end (SPEC §15): a real gateway in front of the simulator settles the tasks that cross
its team's thresholds, and a receiver on loopback verifies the signed `budget.threshold_reached` events."""

from __future__ import annotations

from tests.e2e.harness import body, wait_until
from tests.e2e.test_webhooks import SHORT, create, hooked, settle
from tests.e2e.webhook_receiver import Receiver, new_secret


def budget_events(rx: Receiver) -> list[dict]:
    return [e for e in rx.delivered().values() if e["type"] == "budget.threshold_reached"]


def test_each_threshold_is_announced_once_signed_logged_and_counted(make_gateway, sim):
    secret = new_secret()
    with Receiver(secret) as rx:
        gw = hooked(
            make_gateway,
            secret,
            rx.url,
            start=False,
            gw={"teams": {"red": {"budget_usd": 3.0, "alert_thresholds": [0.5, 1.0]}, "blue": {}}},
        )
        gw.start()
        for _ in range(2):  # $1 each: $2 of $3 reaches 0.5
            settle(gw, create(gw))
        wait_until(lambda: len(budget_events(rx)) == 1, 15)
        settle(gw, create(gw))  # $3 of $3: 1.0
        wait_until(lambda: len(budget_events(rx)) == 2, 15)
        with gw.client("alice") as client:  # the budget is spent: refused, and no further alert
            assert client.post("/videos/generations", json=body(prompt=SHORT)).status_code == 429
        assert not rx.rejected, rx.rejected  # every delivery's signature verified
        first, second = sorted(budget_events(rx), key=lambda e: e["data"]["threshold"])
        assert first["object"] == "event" and first["id"].startswith("evt_")
        assert {k: v for k, v in first["data"].items() if k != "period"} == {
            "scope": "team",
            "name": "red",
            "team": "red",
            "threshold": 0.5,
            "spent_usd": 2.0,
            "budget_usd": 3.0,
            "video_seconds_spent": 10.0,
            "video_seconds_budget": None,
        }
        assert (second["data"]["threshold"], second["data"]["spent_usd"]) == (1.0, 3.0)
        assert first["data"]["period"] == second["data"]["period"] and len(first["data"]["period"]) == 7  # 2026-12
        assert gw.metric("tokenhub_gateway_budget_alerts_total", scope="team", threshold="0.5") == 1
        assert gw.metric("tokenhub_gateway_budget_alerts_total", scope="team", threshold="1.0") == 1
        logged = [line for line in gw.lines() if line.get("event") == "budget.threshold_reached"]
        assert sorted((line["threshold"], line["name"]) for line in logged) == [(0.5, "red"), (1.0, "red")]


def test_a_budget_lowered_through_the_api_below_the_spend_announces_what_it_passes(make_gateway, sim):
    secret = new_secret()
    with Receiver(secret) as rx:
        gw = hooked(make_gateway, secret, rx.url)
        made = gw.admin("POST", "/admin/teams", json={"name": "green", "budget_usd": 100, "alert_thresholds": [0.5]})
        assert made.status_code == 201, made.text
        assert gw.admin("POST", "/admin/users", json={"name": "carol", "team": "green"}).status_code == 201
        issued = gw.admin("POST", "/admin/users/carol/keys", json={})
        assert issued.status_code == 201, issued.text
        gw.user_keys["carol"] = issued.json()["key"]
        settle(gw, create(gw, user="carol"), user="carol")  # $1 of $100
        assert budget_events(rx) == []
        lowered = gw.admin("PATCH", "/admin/teams/green", json={"budget_usd": 1.5})  # $1 of $1.50 passes 0.5
        assert lowered.status_code == 200, lowered.text
        wait_until(lambda: len(budget_events(rx)) == 1, 15)
        [event] = budget_events(rx)
        assert (event["data"]["name"], event["data"]["threshold"], event["data"]["budget_usd"]) == ("green", 0.5, 1.5)
        assert gw.admin("PATCH", "/admin/teams/green", json={"budget_usd": 1.2}).status_code == 200
        assert gw.metric("tokenhub_gateway_budget_alerts_total", scope="team", threshold="0.5") == 1  # once
