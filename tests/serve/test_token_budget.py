"""The per-tenant token buckets (serve/token_budget.py) on a fake clock."""

from __future__ import annotations

import math

import pytest

from serve.token_budget import TokenBudget, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_new_tenant_starts_full_and_a_reservation_takes_its_tokens(clock):
    budget = TokenBudget(600, clock)  # 10 tokens per second
    assert budget.available("acme") == 600
    assert budget.reserve("acme", 250) == 0.0
    assert budget.available("acme") == 350
    assert budget.available("beta") == 600  # buckets are per tenant


def test_settle_refunds_what_was_not_used_and_charges_an_excess(clock):
    budget = TokenBudget(600, clock)
    budget.reserve("acme", 300)
    budget.settle("acme", reserved=300, used=40)
    assert budget.available("acme") == 600 - 40
    budget.reserve("acme", 100)
    budget.settle("acme", reserved=100, used=130)  # the prompt estimate fell short: charged the 30 more
    assert budget.available("acme") == 600 - 40 - 130


def test_the_level_is_never_negative_nor_above_the_capacity(clock):
    budget = TokenBudget(600, clock)
    budget.reserve("acme", 500)
    budget.settle("acme", reserved=500, used=5000)
    assert budget.available("acme") == 0
    budget.settle("acme", reserved=600, used=0)  # a refund cannot overfill
    assert budget.available("acme") == 600
    clock.now -= 30  # a clock that steps back drains nothing
    assert budget.available("acme") == 600


def test_the_bucket_refills_continuously_up_to_the_capacity(clock):
    budget = TokenBudget(600, clock)
    budget.reserve("acme", 600)
    clock.now += 1.5
    assert budget.available("acme") == pytest.approx(15)
    clock.now += 30
    assert budget.available("acme") == pytest.approx(315)
    clock.now += 3600
    assert budget.available("acme") == 600


def test_a_refusal_says_when_the_tokens_will_be_there_and_takes_nothing(clock):
    budget = TokenBudget(600, clock)
    budget.reserve("acme", 580)
    wait = budget.reserve("acme", 100)
    assert wait == pytest.approx(8.0)  # 80 missing at 10 per second
    assert budget.available("acme") == pytest.approx(20)
    assert budget.reset_s("acme") == pytest.approx(58.0)
    clock.now += wait
    assert budget.reserve("acme", 100) == 0.0
    assert budget.available("acme") == pytest.approx(0, abs=1e-9)


def test_concurrent_reservations_each_hold_their_tokens_until_settled(clock):
    budget = TokenBudget(1000, clock)
    assert [budget.reserve("acme", 300) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.reserve("acme", 300) > 0  # 100 left
    budget.settle("acme", reserved=300, used=50)  # one ends early
    assert budget.reserve("acme", 300) == 0.0  # 350 left: the fourth fits now
    assert budget.available("acme") == pytest.approx(50)
    for used in (300, 300, 10):
        budget.settle("acme", reserved=300, used=used)
    assert budget.available("acme") == pytest.approx(1000 - 50 - 300 - 300 - 10)


def test_a_request_larger_than_the_capacity_can_never_fit(clock):
    budget = TokenBudget(600, clock)
    assert budget.reserve("acme", 601) == math.inf
    assert budget.available("acme") == 600
    assert budget.reserve("acme", 600) == 0.0  # the whole budget does fit


def test_the_budget_must_be_positive():
    with pytest.raises(ValueError, match="tokens_per_minute"):
        TokenBudget(0)


@pytest.mark.parametrize("seconds, text", [(0.0, "0ms"), (0.0174, "18ms"), (1.5, "1.5s"), (59.0, "59s"),
                                           (360.0, "6m0s"), (61.25, "1m1.25s")])
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text
