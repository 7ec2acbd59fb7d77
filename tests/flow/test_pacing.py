"""The poller's pacing (gateway.flow.pacing): a token bucket per upstream key, and the queue of leased due
tasks served round robin across the keys whose budget allows a poll."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.flow.pacing import BURST_S, DueQueue, KeyBudgets, TokenBucket
from tests.doubles import make_settings
from tests.flow.test_poller import KEYS, task


def budgets(rate: float = 10.0, keys: dict[str, str] = KEYS) -> KeyBudgets:
    made = KeyBudgets()
    made.apply(make_settings(keys=keys, poller={"max_polls_per_second": rate}), 0.0)
    return made


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    rate=st.sampled_from([0.5, 3.0, 50.0, 1000.0]),
    gaps=st.lists(st.floats(min_value=0, max_value=0.3), min_size=1, max_size=200),
)
def test_a_bucket_never_gives_more_than_its_burst_and_its_rate(rate: float, gaps: list[float]):
    bucket = TokenBucket(rate, 0.0)
    now = 0.0
    taken: list[float] = []
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        if wait == 0.0:
            taken.append(now)
        else:  # the wait it names is enough: a token is there then
            assert TokenBucket.take(_copy(bucket), now + wait + 1e-9) == 0.0
    burst = max(1.0, rate * BURST_S)
    for first in range(len(taken)):
        for last in range(first, len(taken)):
            assert last - first + 1 <= burst + rate * (taken[last] - taken[first]) + 1e-6


def _copy(bucket: TokenBucket) -> TokenBucket:
    twin = TokenBucket(bucket.rate, 0.0)
    twin.__dict__.update(bucket.__dict__)
    return twin


def test_a_bucket_paced_by_its_waits_gives_its_rate():
    bucket = TokenBucket(20.0, 0.0)
    now = 0.0
    taken = 0
    while now < 10.0:
        wait = bucket.take(now)
        taken += wait == 0.0
        now += wait
    assert 200 <= taken <= 200 + bucket.burst + 1


def test_budgets_follow_the_configured_keys_and_rate_and_keep_a_kept_keys_bucket():
    made = budgets(10.0)
    kept = made.bucket(task(1, "a", due=0))
    assert kept is not None and made.keys == 2
    made.apply(make_settings(keys={"a": KEYS["a"], "c": "th-poller-key-c-0123456789"}, poller={}), 5.0)
    assert made.keys == 2 and made.bucket(task(1, "b", due=0)) is None
    assert made.bucket(task(1, "a", due=0)) is not kept  # the rate changed from 10 to the default 50
    same = make_settings(keys={"a": KEYS["a"]}, poller={"max_polls_per_second": 50})
    bucket = made.bucket(task(1, "a", due=0))
    made.apply(same, 6.0)
    assert made.bucket(task(1, "a", due=0)) is bucket and made.keys == 1


def test_a_task_that_asks_tokenhub_nothing_draws_on_no_budget():
    made = budgets()
    assert made.bucket(task(1, "a", due=0, status="pending")) is None
    assert made.bucket(task(2, "gone", due=0)) is None  # its key is no longer configured: fails without a call


def test_the_queue_serves_keys_round_robin_and_skips_a_key_out_of_budget():
    made = budgets(rate=5.0)  # a burst of one
    queue = DueQueue()
    over = queue.add([task(n, "a", due=0) for n in range(3)] + [task(n, "b", due=0) for n in range(3, 6)], 0.0, made)
    assert over == [] and len(queue) == 6
    order = [queue.take(made, 0.0)[0] for _ in range(2)]
    assert [t.key_name for t in order if t] == ["a", "b"]
    nothing, wait = queue.take(made, 0.0)  # both keys spent their burst
    assert nothing is None and 0 < wait <= 0.2
    assert queue.take(made, 0.2)[0] is not None and len(queue) == 3


def test_the_queue_hands_back_what_a_key_cannot_poll_soon_due_when_its_budget_reaches_it():
    made = budgets(rate=10.0)  # holds 2 + 10 a key
    queue = DueQueue()
    over = queue.add([task(n, "a", due=0) for n in range(15)] + [task(99, "b", due=0)], 0.0, made)
    assert len(queue) == 13
    assert [(t.rid, round(s, 2)) for t, s in over] == [("r12", 1.2), ("r13", 1.3), ("r14", 1.4)]


def test_the_queue_forgets_tasks_whose_lease_runs_out_and_drains():
    made = budgets()
    queue = DueQueue()
    queue.add([task(1, "a", due=0), task(2, "b", due=0)], 0.0, made)
    queue.add([task(3, "a", due=0)], 5.0, made)
    assert queue.drop_fetched_before(1.0) == 2 and len(queue) == 1
    assert [t.rid for t in queue.drain()] == ["r3"] and len(queue) == 0
    assert queue.take(made, 9.0) == (None, 0.0)
