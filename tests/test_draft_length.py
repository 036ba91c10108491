"""The draft-length choice (serving/draft_length.py) against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vllm_amphista import machine
from vllm_amphista.serving import draft_length
from vllm_amphista.serving.draft_length import (
    PROBE_ROWS,
    PROBE_SHARE,
    AcceptanceTracker,
    StepClock,
    StepCost,
    choose_lengths,
    drafting_gain,
    heads_that_pay,
    probe_interval,
    probe_steps,
    step_cost_path,
)


def _rate(lengths, chance, cost):
    """Tokens per ms of a step whose draft pass has run."""
    requests = len(lengths)
    gained = sum(chance[i, :n].sum() for i, n in enumerate(lengths))
    return (requests + gained) / (cost.step_ms(requests, requests + sum(lengths))
                                  + cost.draft_ms(requests))


@pytest.mark.parametrize("per_token", [0.05, 0.5, 2.0])
def test_choice_is_the_best_prefix_lengths(per_token):
    rng = np.random.default_rng(0)
    cost = StepCost(batch_sizes=(1, 16), fixed_ms=(20.0, 35.0),
                    per_token_ms=(per_token, 2 * per_token), draft_ms_at=(1.2, 4.2))
    for _ in range(20):
        chance = np.cumprod(rng.uniform(0.0, 1.0, size=(3, 3)), axis=1)
        got = choose_lengths(chance, cost)
        best = max(itertools.product(range(4), repeat=3), key=lambda n: _rate(n, chance, cost))
        assert _rate(got, chance, cost) == pytest.approx(_rate(best, chance, cost))


def test_nothing_is_proposed_when_no_draft_pays_for_its_verification():
    cost = StepCost.linear(10.0, 5.0, 2.0)
    assert choose_lengths(np.array([[0.1, 0.01]]), cost) == [0]
    assert choose_lengths(np.array([[0.99, 0.98]]), cost) == [2]
    # The draft pass is sunk: a draft that pays for its verification is verified even
    # where the whole drafting step does not beat a plain one.
    dear_pass = StepCost.linear(10.0, 1.0, 50.0)
    assert choose_lengths(np.array([[0.2, 0.01]]), dear_pass) == [1]
    assert drafting_gain(1, np.array([0.2, 0.01]), dear_pass) < 1


def test_fit_recovers_the_engine_and_interpolates_between_batch_sizes():
    truth = StepCost(batch_sizes=(1, 4, 16), fixed_ms=(40.0, 45.0, 60.0),
                     per_token_ms=(0.5, 1.0, 2.5), draft_ms_at=(3.0, 4.0, 8.0))
    steps = [{"requests": b, "tokens": b * n, "ms": float(truth.step_ms(b, b * n))}
             for b in truth.batch_sizes for n in (1, 3, 5)]
    drafts = [{"requests": b, "ms": truth.draft_ms(b)} for b in truth.batch_sizes]
    fitted = StepCost.fit(steps, drafts)
    for field, value in vars(truth).items():
        assert getattr(fitted, field) == pytest.approx(value, abs=1e-6)
    assert fitted.step_ms(10, 10) == pytest.approx(52.5 + 1.75 * 10)  # halfway 4..16
    assert fitted.step_ms(28, 28) == pytest.approx(75.0 + 4.0 * 28)  # last slope onwards


def test_drafting_stops_above_the_batch_size_where_it_cannot_pay():
    """Verification grows with the batch (per_token), the plain step does not as fast:
    the same chances pay at 1 request and not at 64."""
    cost = StepCost(batch_sizes=(1, 16), fixed_ms=(40.0, 45.0), per_token_ms=(0.8, 2.0),
                    draft_ms_at=(2.0, 6.5))
    chance = np.array([0.3, 0.05, 0.01])
    assert drafting_gain(1, chance, cost) > 1 > drafting_gain(64, chance, cost)


@pytest.mark.parametrize("requests", [1, 4, 16])
def test_probes_while_paused_cost_at_most_their_share(requests):
    """The tightest spacing of probes whose time (the catch-up, and per drafting step of
    the probe a draft pass and a draft verified per request) stays within PROBE_SHARE of
    the plain steps between them; a probe drafts `probe_rows` rows (PROBE_ROWS, one at
    one request)."""
    cost = StepCost(batch_sizes=(1, 16), fixed_ms=(55.8, 77.3), per_token_ms=(3.0, 3.0),
                    draft_ms_at=(14.9, 26.9))
    interval = probe_interval(requests, cost, warm_ms=5.0)
    plain_ms = float(cost.step_ms(requests, requests))
    steps = {1: 1, 4: 4, 16: 1}[requests]
    assert probe_steps(requests) == steps
    assert steps * requests == (PROBE_ROWS if requests > 1 else 1)
    probe_ms = 5.0 + steps * (cost.draft_ms(requests) + requests * 3.0)
    assert probe_ms <= PROBE_SHARE * interval * plain_ms
    assert probe_ms > PROBE_SHARE * (interval - 1) * plain_ms


def test_drafting_gain_judges_requests_by_their_own_chances_not_the_mean():
    """Half the requests confident, half not: drafting for the confident half pays, while
    every request at the mean chance would not."""
    cost = StepCost.linear(40.0, 8.0, 4.0)
    rows = np.array([[0.9, 0.5], [0.02, 0.0]] * 8)
    assert drafting_gain(4, rows, cost) > 1 > drafting_gain(4, rows.mean(0), cost)


def test_acceptance_tracker_learns_how_far_confidence_is_off_per_position():
    """Heads twice as confident as the target's acceptance at position 1 and too shy at
    position 2: the chance for a confidence converges to what was accepted, and stays
    non-increasing along the drafts."""
    rng = np.random.default_rng(0)
    tracker = AcceptanceTracker(2)
    assert tracker.chance(np.array([[0.6, 0.1]])) == pytest.approx(np.array([[0.6, 0.1]]))
    for _ in range(2000):
        first = rng.random() < 0.3  # confidence 0.6: half
        second = first and rng.random() < 0.5  # 0.15 in all for confidence 0.1: 1.5x
        tracker.record(np.array([[0.6, 0.1]]), np.array([2]),
                       np.array([int(first) + int(second)]))
    chance = tracker.chance(np.array([[0.6, 0.1], [0.2, 0.2]]))
    assert chance[0] == pytest.approx([0.3, 0.15], abs=0.04)
    assert chance[1] == pytest.approx([0.1, 0.1], abs=0.02)  # 0.3 at position 2, capped


def test_acceptance_tracker_is_not_swayed_by_a_few_early_rejections():
    """The heads' confidence counts as PRIOR drafts' worth of evidence. Four rejected
    drafts of confidence 0.5 (the first MT-Bench question's first drafts are rejected,
    in every greedy run) leave the next one's chance near 0.4; with a prior of 2 they
    left it at 0.13, and drafting paused at one request for a whole in-process run
    (docs/results.md). A few hundred rejections still win."""
    tracker = AcceptanceTracker(1)
    rejected = (np.array([[0.5]]), np.array([1]), np.array([0]))
    for _ in range(4):
        tracker.record(*rejected)
    assert tracker.chance(np.array([[0.5]]))[0, 0] > 0.35
    for _ in range(300):
        tracker.record(*rejected)
    assert tracker.chance(np.array([[0.5]]))[0, 0] < 0.1


def test_acceptance_tracker_learns_per_band_of_confidence():
    """Heads right about their unsure drafts (0.2 -> 0.2 accepted) and 20% too sure of
    their sure ones (0.9 -> 0.72), the unsure three times as common, as at one request:
    the chance of a sure draft is what sure drafts achieved, not a factor averaged over
    both, which would put it at 0.79 (what a load that verifies only sure drafts pays
    for) and the unsure at 0.18."""
    rng = np.random.default_rng(1)
    tracker = AcceptanceTracker(1)
    for step in range(4000):
        sure = step % 4 == 0
        accepted = rng.random() < (0.72 if sure else 0.2)
        tracker.record(np.array([[0.9 if sure else 0.2]]), np.array([1]),
                       np.array([int(accepted)]))
    chance = tracker.chance(np.array([[0.9], [0.2], [0.55]]))[:, 0]
    assert chance[0] == pytest.approx(0.72, abs=0.04)
    assert chance[1] == pytest.approx(0.2, abs=0.02)
    assert chance[2] == pytest.approx(0.55 * 0.86, abs=0.05)  # no evidence: the position's


def test_acceptance_tracker_keeps_greedy_and_sampled_requests_apart():
    """Mixed traffic: greedy requests accept 85% of their 0.9-confident drafts, sampled
    ones 50% (the target's probability of the draft, not whether it is the argmax). Each
    kind's chance is its own; one factor for both would price both at ~0.68."""
    rng = np.random.default_rng(2)
    tracker = AcceptanceTracker(1)
    for step in range(4000):
        sampled = step % 2 == 1
        accepted = rng.random() < (0.5 if sampled else 0.85)
        tracker.record(np.array([[0.9]]), np.array([1]), np.array([int(accepted)]),
                       np.array([sampled]))
    both = np.array([[0.9], [0.9]])
    chance = tracker.chance(both, np.array([False, True]))[:, 0]
    assert chance == pytest.approx([0.85, 0.5], abs=0.04)
    assert tracker.chance(both)[:, 0] == pytest.approx([0.85, 0.85], abs=0.04)  # default: greedy


def test_step_clock_measures_drafting_steps_against_plain_ones():
    """Drafting steps that run 1.5x what the step cost predicts while plain steps run as
    predicted: the overhead converges to 1.5; a machine twice as slow for both kinds
    leaves it at 1; a stall counts as MAX_RATIO; pausing keeps the drafting figure."""
    clock = StepClock()
    assert clock.overhead(1) == 1.0
    for _ in range(300):
        clock.record(1, True, 15.0, 10.0, 10.0, 1)
        clock.record(1, False, 10.0, 10.0, 10.0, 1)
    assert clock.overhead(1) == pytest.approx(1.5, abs=0.01)
    for _ in range(300):
        clock.record(1, False, 10.0, 10.0, 10.0, 1)  # paused: plain steps only
    assert clock.overhead(1) == pytest.approx(1.5, abs=0.01)
    slower = StepClock()
    for _ in range(300):
        slower.record(1, True, 20.0, 10.0, 10.0, 1)
        slower.record(1, False, 20.0, 10.0, 10.0, 1)
    assert slower.overhead(1) == pytest.approx(1.0)
    stalled = StepClock()
    for _ in range(300):
        stalled.record(1, False, 10.0, 10.0, 10.0, 1)
    stalled.record(1, True, 1000.0, 10.0, 10.0, 1)
    # Drafting's prior weighs in at the ratio of every step timed there, the stall's too.
    plain = (1 - StepClock.DECAY ** 300) / (1 - StepClock.DECAY)  # decayed plain steps
    pooled = (plain + StepClock.MAX_RATIO) / (plain + 1)
    prior = StepClock.DECAY * StepClock.PRIOR
    assert stalled.overhead(1) == pytest.approx(
        (prior * pooled + StepClock.MAX_RATIO) / (prior + 1), abs=0.01)


def test_step_clock_takes_an_untimed_kind_to_run_as_the_timed_one():
    """An engine whose plain steps run 20% under the step cost (in-process, a faster
    hour), drafting not timed yet: the overhead stays 1, not 1 / 0.8, which would price
    drafting out before one drafting step is timed. Drafting steps that then run 20%
    under as well keep it at 1; drafting steps as predicted raise it to 1.25."""
    clock = StepClock()
    for _ in range(300):
        clock.record(1, False, 8.0, 10.0, 10.0, 1)
    assert clock.overhead(1) == pytest.approx(1.0)
    for _ in range(300):
        clock.record(1, True, 8.0, 10.0, 10.0, 2)
    assert clock.overhead(1) == pytest.approx(1.0)
    for _ in range(300):
        clock.record(1, True, 10.0, 10.0, 10.0, 2)
    assert clock.overhead(1) == pytest.approx(1.25, abs=0.01)


def test_step_clock_compares_kinds_at_one_batch_size():
    """At one request plain steps run as predicted and drafting ones 10% under; 16
    requests never draft and run 20% over. Where drafting was not timed (16, and 4 with
    nothing timed) it is taken to cost what it costs at the nearest size where both kinds
    were (1: 0.9), not 1, until its own steps are timed; then each size keeps its own
    figures, so neither moves the other's overhead. Sizes between go to the nearest
    calibrated one on a log scale (3 -> 4, 9 -> 16)."""
    clock = StepClock((1, 4, 16))
    for _ in range(300):
        clock.record(1, False, 10.0, 10.0, 10.0, 1)
        clock.record(1, True, 9.0, 10.0, 10.0, 1)
        clock.record(16, False, 12.0, 10.0, 10.0, 16)
    assert clock.overhead(1) == pytest.approx(0.9, abs=0.01)
    assert clock.overhead(16) == pytest.approx(0.9, abs=0.01)
    assert clock.overhead(4) == pytest.approx(0.9, abs=0.01)
    for _ in range(300):
        clock.record(3, False, 10.0, 10.0, 10.0, 3)
        clock.record(3, True, 15.0, 10.0, 10.0, 3)
        clock.record(9, True, 24.0, 10.0, 10.0, 9)
    assert clock.overhead(4) == pytest.approx(1.5, abs=0.01)
    assert clock.overhead(12) == pytest.approx(2.0, abs=0.01)
    assert clock.overhead(1) == pytest.approx(0.9, abs=0.01)


def test_step_clock_keeps_greedy_and_sampled_traffic_apart():
    """Sampled drafting steps running 1.5x their prediction (greedy ones 1.1x) set the
    sampled overhead, not the greedy one, at their size and, borrowed, at a size where
    sampled drafting was not timed yet; each kind's yield is its own."""
    clock = StepClock((1, 4, 16))
    for _ in range(100):
        for sampled, ratio, tokens in ((False, 1.1, 1.6), (True, 1.5, 1.2)):
            clock.record(4, False, 10.0, 10.0, 10.0, 4, sampled=sampled)
            clock.record(4, True, 10.0 * ratio, 10.0, 10.0, 4 * tokens, sampled=sampled)
    assert clock.overhead(4) == pytest.approx(1.1, abs=0.01)
    assert clock.overhead(4, sampled=True) == pytest.approx(1.5, abs=0.01)
    assert clock.overhead(16, sampled=True) == pytest.approx(1.5, abs=0.01)
    assert clock.overhead(16) == pytest.approx(1.1, abs=0.01)
    assert clock.realized_gain(4) == pytest.approx(1.6 / 1.1)
    assert clock.realized_gain(4, sampled=True) == pytest.approx(1.2 / 1.5)


def test_step_clock_borrows_an_overhead_from_the_same_kind_of_traffic_only():
    """Greedy drafting timed only at one request (0.9), sampled only at 16 (1.5): an
    untimed size borrows each kind's from where that kind was timed, even where a size
    timed for the other kind is as near."""
    clock = StepClock((1, 4, 16))
    for _ in range(300):
        for size, sampled, ratio in ((1, False, 0.9), (16, True, 1.5)):
            clock.record(size, False, 10.0, 10.0, 10.0, size, sampled=sampled)
            clock.record(size, True, 10.0 * ratio, 10.0, 10.0, size, sampled=sampled)
    assert clock.overhead(4, sampled=True) == pytest.approx(1.5, abs=0.01)
    assert clock.overhead(4) == pytest.approx(0.9, abs=0.01)


def test_step_clock_checks_what_drafting_steps_yielded_against_plain_ones():
    """Nothing to compare until both kinds are timed MIN_TIMED times at a size. Plain
    steps of 3 requests emit 3 tokens in the predicted plain time; drafting steps of 3
    emit 4.5 tokens in 1.2x that time: 1.25x. Steps of 4 that share the calibrated size
    are counted per request and per unit of their own plain time, so they compare with
    the steps of 3. Drafting steps that emit only the plain tokens in more time: < 1."""
    clock = StepClock((1, 4))
    for _ in range(8):
        clock.record(3, False, 30.0, 30.0, 30.0, 3)
        clock.record(3, True, 36.0, 40.0, 30.0, 5)
    assert clock.realized_gain(3) is None and not clock.plain_timed(3)
    clock.record(3, False, 30.0, 30.0, 30.0, 3)
    assert clock.plain_timed(3) and clock.realized_gain(3) is None
    clock.record(3, True, 36.0, 40.0, 30.0, 5)
    assert clock.realized_gain(3) == pytest.approx(5 / 3 / 1.2)
    gains = StepClock((1, 4))
    for _ in range(50):
        gains.record(3, False, 30.0, 30.0, 30.0, 3)
        gains.record(4, True, 48.0, 50.0, 40.0, 6)
    assert gains.realized_gain(4) == pytest.approx(1.25)
    assert gains.realized_gain(1) is None
    for _ in range(300):
        gains.record(4, True, 44.0, 50.0, 40.0, 4)
    assert gains.realized_gain(4) == pytest.approx(1 / 1.1, abs=0.01)


def test_realized_gain_starts_from_the_models_expectation():
    """Nine drafting steps (MIN_TIMED, decayed) that yield 0.9 of plain ones, the model
    expecting 1.2: the reading starts near the model's (EXPECTED_STEPS of it against
    nine measured), and 300 more such steps leave the measurement alone."""
    clock = StepClock()
    for _ in range(9):
        clock.record(1, False, 10.0, 10.0, 10.0, 1)
        clock.record(1, True, 10.0, 10.0, 10.0, 0.9)
    assert clock.realized_gain(1) == pytest.approx(0.9)
    weight = StepClock.EXPECTED_STEPS * StepClock.DECAY ** 9
    timed = (1 - StepClock.DECAY ** 9) / (1 - StepClock.DECAY)
    assert clock.realized_gain(1, expected=1.2) == pytest.approx(
        (timed * 0.9 + weight * 1.2) / (timed + weight))
    assert clock.realized_gain(1, expected=1.2) > 1.0
    for _ in range(300):
        clock.record(1, True, 10.0, 10.0, 10.0, 0.9)
    assert clock.realized_gain(1, expected=1.2) == pytest.approx(0.9, abs=0.01)


def test_what_drafting_yielded_at_one_request_goes_with_the_request():
    """Drafting steps at one request and at 16 that yielded 0.9 of plain ones: a pause
    of plain steps keeps that (the model's expectation, 1.2, weighs nothing against it).
    When the only request finishes, the one-request reading goes (no reading until
    drafting steps are timed again: the model decides); the 16-request reading, the
    engine's more than the text's, and the overhead stay."""
    clock = StepClock((1, 4, 16))
    for size in (1, 16):
        for _ in range(10):
            clock.record(size, False, 10.0, 10.0, 10.0, size)
        for _ in range(300):
            clock.record(size, True, 15.0, 10.0, 10.0, 1.35 * size)
        for _ in range(150):
            clock.record(size, False, 10.0, 10.0, 10.0, size)
        assert clock.realized_gain(size, expected=1.2) == pytest.approx(0.9, abs=0.01)
    overheads = clock.overhead(1), clock.overhead(16)
    for _ in range(16):
        clock.request_finished()
    assert clock.realized_gain(1) is None and clock.realized_gain(1, expected=1.2) is None
    assert clock.realized_gain(16, expected=1.2) == pytest.approx(0.9, abs=0.01)
    assert (clock.overhead(1), clock.overhead(16)) == overheads
    for _ in range(10):
        clock.record(1, True, 10.0, 10.0, 10.0, 1.1)
    assert clock.realized_gain(1) == pytest.approx(1.1)


def test_drafting_gain_is_the_best_drafting_steps_pace_over_plain_steps():
    """What the proposer holds to the step clock's overhead: one draft verified, 1.25
    tokens in 48 ms (draft pass included) against 1 in 42, pays by ~9% under the step
    cost alone, so drafting steps seen to run 5% over it still pay and 20% over do not."""
    cost = StepCost.linear(40.0, 2.0, 4.0)
    chance = np.array([0.25, 0.02, 0.0])
    assert drafting_gain(1, chance, cost) == pytest.approx(1.25 / 48 * 42)


def test_the_heads_drafted_are_those_whose_part_of_the_pass_pays():
    """A head reading the second SAL stage costs that stage whether its draft is verified
    or not: where heads 3 and 4 double the pass for chains of 0.5 * 0.3 * ..., two heads
    pay best; confident heads that each cost a quarter of the pass all pay; a head that
    adds nothing at the same cost is not drafted (the fewest on a tie)."""
    base = StepCost.linear(10.0, 0.5, 2.0)

    def shared(shares):
        return lambda heads: StepCost.linear(10.0, 0.5, 2.0 * shares[heads - 1])

    top1 = [0.5, 0.3, 0.2, 0.15]
    heads, gains = heads_that_pay(top1, shared([0.3, 0.5, 1.0, 1.0]))
    assert heads == 2 and gains[1] == max(gains) > gains[3]
    assert gains[1] == pytest.approx(drafting_gain(1, np.cumprod(top1)[:2],
                                                   shared([0.3, 0.5, 1.0, 1.0])(2)))
    assert heads_that_pay([0.9] * 4, shared([0.25, 0.5, 0.75, 1.0]))[0] == 4
    assert heads_that_pay([0.5, 0.0, 0.0, 0.0], lambda heads: base)[0] == 1


def test_a_machines_calibration_is_kept_per_cpu_family(monkeypatch):
    """Two EPYC generations a VM names alike ("AMD EPYC") keep apart calibrations; the
    same CPU finds its own again."""
    def path_on(family: str):
        cpu = machine.CpuInfo("AMD EPYC", frozenset({"avx512_bf16"}), family)
        monkeypatch.setattr(draft_length, "cpu_info", lambda: cpu)
        return step_cost_path("SmolLM2-135M-Instruct", "bfloat16", threads=2)

    assert path_on("25") != path_on("26") and path_on("26") == path_on("26")


def test_a_machines_calibration_is_kept_per_openmp(monkeypatch):
    """A step measured under GNU OpenMP does not price one under Intel's (0.80 against
    0.17 ms a verified token on one EPYC); the runtime this process computes with is the
    default key."""
    def path_under(openmp: str | None):
        return step_cost_path("SmolLM2-135M-Instruct", "bfloat16", threads=2, openmp=openmp)

    monkeypatch.setattr(draft_length, "openmp_runtime", lambda: "intel")
    assert path_under("gnu") != path_under("intel") == path_under(None)
