"""Creates (gateway.flow.creates): an answer too large to read is an unknown outcome (SPEC §4); what a
client is answered, and replayed for its idempotency key, is scrubbed of the configured key values."""

from __future__ import annotations

from collections.abc import Callable

from gateway.upstream.client import AnswerTooLarge
from tests.doubles import FakeUpstream
from tests.flow.conftest import Running


def test_an_oversized_answer_to_a_create_is_an_unknown_outcome_charged_its_estimate(
    run_app: Callable[..., Running],
):
    app = run_app(FakeUpstream(raises=AnswerTooLarge(1024, 200)))
    once = {"Idempotency-Key": "too-large-once"}
    for replayed in (None, "true"):
        answer = app.client.post(
            "/v1/videos/generations", json={"model": "doubao-seedance-2.0", "prompt": "a fox"}, headers=once
        )
        assert (answer.status_code, answer.json()["error"]["code"]) == (502, "upstream_bad_response"), answer.text
        assert (answer.headers["x-should-retry"], answer.headers.get("idempotent-replayed")) == ("false", replayed)
    assert len(app.upstream.calls) == 1  # never sent to another key: TokenHub may have made the task
    assert [(row["status"], row["cost_usd"], row["cost_estimated"]) for row in app.ledger()] == [("unknown", 1.0, True)]
    team = app.client.get("/v1/usage").json()["team"]
    assert (team["spent_usd"], team["reserved_usd"], team["tasks_in_flight"]) == (1.0, 0.0, 0)
    unknown = app.metrics.registry.get_sample_value(
        "tokenhub_gateway_tasks_unknown_total", {"team": "red", "reason": "too_large"}
    )
    assert unknown == 1
