"""AmphistaProposer's bookkeeping, driven by synthetic engine steps (no engine)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.config import CompilationMode

from tests.conftest import draft_model, needs_bf16_packing
from vllm_amphista.eval.calibrate import measure_draft_pass
from vllm_amphista.kernels import packed_linear
from vllm_amphista.machine import CpuInfo, cpu_info
from vllm_amphista.model.checkpoint import METRICS_FILE, save_checkpoint
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.serving import draft_length
from vllm_amphista.serving import proposer as proposer_module
from vllm_amphista.serving.draft_length import (
    MAX_PROBE_BACKOFF,
    PROBE_ROWS,
    WARM_STEPS,
    StepCost,
    choose_lengths,
    confidence,
    probe_interval,
    probe_rows,
    probe_steps,
    shipped_step_cost_path,
    step_cost_path,
)
from vllm_amphista.serving.draft_sampling import RequestSampling
from vllm_amphista.serving.proposer import AmphistaProposer, Pause
from vllm_amphista.serving.spec_config import AmphistaSetupError, resolve_speculative_config
from vllm_amphista.serving.step import StepRows


@pytest.fixture()
def heads_dir(tiny_target, tmp_path):
    folder = tmp_path / "heads"
    save_checkpoint(draft_model(tiny_target, randomised=True), folder)
    return folder


def _proposer(heads_dir, target_dir, num_tokens=3, pause=None,
              draft_sampling="sample", step_cost="off",
              draft_dtype="float32", timed=False, choose_heads=False,
              compiled=False) -> AmphistaProposer:
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=num_tokens),
        additional_config={"amphista": {"heads": str(heads_dir),
                                        "disable_by_batch_size": pause,
                                        "draft_sampling": draft_sampling,
                                        "draft_dtype": draft_dtype,
                                        "step_cost": step_cost,
                                        "choose_heads": choose_heads}},
        model_config=SimpleNamespace(model=str(target_dir), dtype=torch.float32),
        device_config=SimpleNamespace(device="cpu"),
        parallel_config=SimpleNamespace(tensor_parallel_size=2),  # read target files
        scheduler_config=SimpleNamespace(max_num_seqs=256, max_num_batched_tokens=8192),
        compilation_config=SimpleNamespace(
            mode=CompilationMode.DYNAMO_TRACE_ONCE if compiled else CompilationMode.NONE),
    )
    proposer = AmphistaProposer(config)
    proposer.load_model(torch.nn.Module())
    if not timed:
        # Synthetic steps take no engine time, which the proposer's clock would read as
        # an engine far faster than its step cost; tests of the clock fake the time.
        # Switched off, it asks for no plain steps to time.
        proposer.clock.record = lambda *args: None
        proposer.clock.plain_timed = lambda requests, sampled=False: True
    return proposer


def test_steps_feed_exactly_the_accepted_positions(heads_dir, tiny_target, tiny_target_dir):
    """Prefill in two chunks, then a decode step where 2 of 3 drafts were accepted:
    the proposer consumes positions 0..L-2 with their next tokens, and its draft is the
    model's own prediction at the last position."""
    proposer = _proposer(heads_dir, tiny_target_dir)
    d = tiny_target.hidden_size
    g = torch.Generator().manual_seed(0)
    sequence = torch.randint(0, tiny_target.vocab_size, (20,), generator=g)
    hidden = torch.randn(20, d, generator=g)  # stands in for the target's rows per position
    table = np.zeros((1, 64), np.int32)

    def step(start, rows, sampled, num_drafts, known):
        table[0, :known] = sequence[:known].numpy()
        return proposer.propose_from_step(StepRows(
            req_ids=["r"], sampled_token_ids=[sampled],
            hidden_states=hidden[start: start + rows],
            query_start_loc=np.array([0, rows]), start_positions=np.array([start]),
            num_draft_tokens=np.array([num_drafts]), token_ids=table)).tokens

    # Prompt = 10 tokens: chunk of 6 (no sample), then 4 more and the first sample (pos 10).
    assert step(0, 6, [], 0, known=10) == [[]]
    assert proposer.cached_positions("r") == 6
    assert len(step(6, 4, [int(sequence[10])], 0, known=11)[0]) == 3
    # Decode: input = [x10, d1, d2, d3]; d1, d2 accepted + bonus -> 3 sampled, positions 10..12.
    draft = step(10, 4, sequence[11:14].tolist(), 3, known=14)
    assert proposer.cached_positions("r") == 13
    want = proposer.model(hidden[None, :13], sequence[None, 1:14])[0, -1].argmax(-1)[:3]
    assert draft == [want.tolist()]

    # Recompute after preemption restarts the cache at position 0.
    step(0, 8, [], 0, known=14)
    assert proposer.cached_positions("r") == 8
    proposer.release("r")
    assert proposer.cache_stats() == {"sequences": 0, "bytes": 0}


def test_a_long_prompt_feeds_only_its_last_rows(heads_dir, tiny_target, tiny_target_dir,
                                                monkeypatch):
    """A chunk of more than PROMPT_TAIL rows restarts its slot with its last PROMPT_TAIL
    rows, a chunk that follows the slot's last one included; shorter steps extend the
    slot as usual: the draft is the model's prediction from the prompt's last rows on."""
    monkeypatch.setattr(proposer_module, "PROMPT_TAIL", 5)
    proposer = _proposer(heads_dir, tiny_target_dir)
    d = tiny_target.hidden_size
    g = torch.Generator().manual_seed(1)
    sequence = torch.randint(0, tiny_target.vocab_size, (20,), generator=g)
    hidden = torch.randn(20, d, generator=g)
    table = sequence[None, :].numpy().astype(np.int32)

    def step(start, rows, sampled, num_drafts):
        return proposer.propose_from_step(StepRows(
            req_ids=["r"], sampled_token_ids=[sampled],
            hidden_states=hidden[start: start + rows],
            query_start_loc=np.array([0, rows]), start_positions=np.array([start]),
            num_draft_tokens=np.array([num_drafts]), token_ids=table)).tokens

    step(0, 7, [], 0)  # 7 > 5 prompt rows: positions 2..6 only
    assert proposer.cached_positions("r") == 5
    step(7, 7, [int(sequence[14])], 0)  # the rest of the 14-token prompt: 9..13 only
    assert proposer.cached_positions("r") == 5
    draft = step(14, 2, sequence[15:17].tolist(), 1)  # the draft accepted, then the bonus
    assert proposer.cached_positions("r") == 7
    want = proposer.model(hidden[None, 9:16], sequence[None, 10:17])[0, -1].argmax(-1)[:3]
    assert draft == [want.tolist()]


@pytest.mark.parametrize("tail, kept", [(128, 0), (5, 6)])
def test_rows_kept_for_a_later_pass_reach_its_draft(tail, kept, heads_dir, tiny_target,
                                                    tiny_target_dir, monkeypatch):
    """Calls that keep their rows (TRACK, a pause's warm-up), then a pass: its draft is
    the model's own prediction over every position, as if each call had run the SAL
    layers. A slot that would keep more than PROMPT_TAIL rows drops its oldest and
    restarts: the draft then reads only the positions from `kept` on."""
    monkeypatch.setattr(proposer_module, "PROMPT_TAIL", tail)
    proposer = _proposer(heads_dir, tiny_target_dir)
    plans = iter([proposer_module.DRAFT] + [proposer_module.TRACK] * 6 + [proposer_module.DRAFT])
    proposer._plan = lambda decoding, sampled=False: next(plans)
    g = torch.Generator().manual_seed(2)
    sequence = torch.randint(0, tiny_target.vocab_size, (20,), generator=g)
    hidden = torch.randn(20, tiny_target.hidden_size, generator=g)
    table = sequence[None, :].numpy().astype(np.int32)

    def step(start, rows):
        return proposer.propose_from_step(StepRows(
            req_ids=["r"], sampled_token_ids=[[int(sequence[start + rows])]],
            hidden_states=hidden[start: start + rows],
            query_start_loc=np.array([0, rows]), start_positions=np.array([start]),
            num_draft_tokens=np.array([0]), token_ids=table)).tokens

    step(0, 5)  # the prompt, through the SAL layers at once
    for position in range(5, 11):
        assert step(position, 1) == [[]]
    assert proposer.cached_positions("r") == 11 - kept
    draft = step(11, 1)
    want = proposer.model(hidden[None, kept:12], sequence[None, kept + 1:13])[0, -1]
    assert draft == [want.argmax(-1)[:3].tolist()]
    assert proposer.cache.lengths[0] == 12 - kept and not proposer.pending.counts.any()


@pytest.mark.parametrize("keep_rows", [False, True])
def test_slots_follow_vllm_reordering_its_batch(keep_rows, heads_dir, tiny_target,
                                                tiny_target_dir):
    """vLLM moves requests between batch rows (a finished one's row is refilled, rows are
    swapped): each request's SAL slot, and the rows it keeps for a later pass (keep_rows:
    the steps in between are TRACK calls), must move with it, so that every draft still
    equals the model's own prediction over that request's whole history."""
    proposer = _proposer(heads_dir, tiny_target_dir)
    middle = proposer_module.TRACK if keep_rows else proposer_module.DRAFT
    d, vocab = tiny_target.hidden_size, tiny_target.vocab_size
    g = torch.Generator().manual_seed(1)
    history = {r: (torch.randn(30, d, generator=g), torch.randint(0, vocab, (31,), generator=g))
               for r in "abcd"}
    fed = dict.fromkeys("abcd", 0)

    def step(req_ids, rows, plan=proposer_module.DRAFT):
        proposer._plan = lambda decoding, sampled=False: plan
        table = np.zeros((len(req_ids), 64), np.int32)
        hidden, starts = [], []
        for i, (r, n) in enumerate(zip(req_ids, rows, strict=True)):
            table[i, :31] = history[r][1].numpy()
            hidden.append(history[r][0][fed[r]: fed[r] + n])
            starts.append(fed[r])
            fed[r] += n
        drafts = proposer.propose_from_step(StepRows(
            req_ids=list(req_ids), sampled_token_ids=[[1]] * len(req_ids),
            hidden_states=torch.cat(hidden), query_start_loc=np.cumsum([0, *rows]),
            start_positions=np.array(starts), num_draft_tokens=np.zeros(len(rows), np.int64),
            token_ids=table)).tokens
        for r, draft in zip(req_ids, drafts, strict=True):
            if plan != proposer_module.DRAFT:
                assert draft == []
                continue
            h, x = history[r]
            want = proposer.model(h[None, : fed[r]], x[None, 1: fed[r] + 1])[0, -1]
            assert draft == want.argmax(-1)[:3].tolist(), (req_ids, r)

    step("abc", [5, 3, 4])
    step("abc", [1, 1, 1], middle)
    proposer.release("a")
    step("cb", [1, 2], middle)  # vLLM condensed: c moved into a's row
    step("bcd", [1, 1, 6], middle)  # swapped back, d joins
    step("dcb", [2, 1, 1])
    assert proposer.cache_stats()["sequences"] == 3


def test_drafting_pauses_above_the_batch_limit(heads_dir, tiny_target, tiny_target_dir):
    """Three decoding requests with a limit of 2: no drafts, no draft pass, and none for
    their prompts either (they will decode three at a time); back to one request: it
    drafts again, its cache restarted at the new rows. A lone prompt is fed."""
    proposer = _proposer(heads_dir, tiny_target_dir, pause=2)
    d = tiny_target.hidden_size
    table = np.arange(3 * 64, dtype=np.int32).reshape(3, 64) % tiny_target.vocab_size

    def step(req_ids, start, sampled):
        n = len(req_ids)
        return proposer.propose_from_step(StepRows(
            req_ids=req_ids, sampled_token_ids=[[5]] * n if sampled else [[]] * n,
            hidden_states=torch.randn(n * 8 if start == 0 else n, d),
            query_start_loc=np.arange(n + 1) * (8 if start == 0 else 1),
            start_positions=np.full(n, start), num_draft_tokens=np.zeros(n, np.int64),
            token_ids=table)).tokens

    assert step(["a", "b", "c"], 0, sampled=False) == [[], [], []]  # prompt chunks
    assert proposer.cached_positions("a") == 0
    assert step(["a", "b", "c"], 8, sampled=True) == [[], [], []]
    assert proposer.cached_positions("a") == 0  # untouched while paused
    assert len(step(["a"], 9, sampled=True)[0]) == 3
    assert proposer.cached_positions("a") == 1  # restarted: positions 0-8 were never fed
    assert step(["d"], 0, sampled=False) == [[]]
    assert proposer.cached_positions("d") == 8


def _kept_its_rows(proposer: AmphistaProposer) -> bool:
    """Whether the last call kept its rows for a later pass (TRACK): it ran no draft pass
    and took time of its own."""
    return not proposer.last_call[2] and proposer.last_call[3] > 0


def _step_of_request_a(proposer: AmphistaProposer, start: int, rows: int,
                       table: np.ndarray) -> None:
    """One engine step of request "a" alone: `rows` new rows from position `start`."""
    proposer.propose_from_step(StepRows(
        req_ids=["a"], sampled_token_ids=[[5]],
        hidden_states=torch.randn(rows, proposer.model.config.hidden_size),
        query_start_loc=np.array([0, rows]), start_positions=np.array([start]),
        num_draft_tokens=np.zeros(1, np.int64), token_ids=table))


def _probes(passes: list[bool]) -> tuple[list[int], list[int]]:
    """Where each run of calls that ran a draft pass starts, and how long it is."""
    starts = [i for i, ran in enumerate(passes) if ran and (i == 0 or not passes[i - 1])]
    lengths = [next((j for j in range(i, len(passes)) if not passes[j]), len(passes)) - i
               for i in starts]
    return starts, lengths


def test_a_paused_proposer_probes_the_heads_now_and_then(heads_dir, tiny_target,
                                                         tiny_target_dir, tmp_path):
    """With a step cost under which these heads never pay, drafting pauses once the first
    `probe_rows` rows of chances judge it; after that only probes draft, the first after
    probe_interval plain steps (their share counting the warm-up and the probe's steps)
    and each next one twice as far (up to MAX_PROBE_BACKOFF times). A probe drops the
    recent chances and drafts until `probe_rows` new rows judge again. The WARM_STEPS
    calls before each probe keep their rows, so the probe drafts with that much context.
    Once drafting pays and pauses again, the spacing starts over, and the first
    WARM_STEPS calls of that pause keep their rows too (the first drafting steps, which
    never paid, have none)."""
    dear = StepCost.linear(fixed_ms=10.0, per_token_ms=10.0, draft_ms=1.0)
    dear.save(tmp_path / "dear.json")
    proposer = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "dear.json"))
    proposer.clock.catch_up_ms = lambda requests: 16.0
    passes, tracked, cached = [], [], []
    table = np.arange(8192, dtype=np.int32)[None] % tiny_target.vocab_size
    interval, probe = probe_interval(1, dear, 16.0), probe_steps(1)
    assert interval > probe_interval(1, dear) > 1 and interval > 2 * WARM_STEPS
    assert MAX_PROBE_BACKOFF == 8
    chances = []
    position = iter(range(9, 8192))

    def call(start, rows):
        _step_of_request_a(proposer, start, rows, table)
        passes.append(proposer.last_call[2])
        tracked.append(_kept_its_rows(proposer))
        cached.append(proposer.cached_positions("a"))
        chances.append(proposer.recent_chance.copy())

    def steps(count):
        for _ in range(count):
            call(next(position), 1)

    call(0, 9)  # the prompt, then decoding
    steps(16 * interval + 5 * probe)
    starts, lengths = _probes(passes)
    assert np.diff(starts).tolist() == [interval + probe, 2 * interval + probe,
                                        4 * interval + probe, 8 * interval + probe]
    assert lengths == [probe] * 5
    assert np.flatnonzero(tracked).tolist() == [
        step for start in starts[1:] for step in range(start - WARM_STEPS, start)]
    assert [cached[start] for start in starts[1:]] == [WARM_STEPS + 1] * 4
    for start in starts[1:]:  # re-measured by each probe: its rows replace the last
        assert len(chances[start - 1]) == probe_rows(1) and len(chances[start]) == 1
        assert not np.allclose(chances[start - 1][-1], chances[start])
        assert len(chances[start + probe - 1]) == probe_rows(1)
    proposer.step_cost = StepCost.linear(fixed_ms=10.0, per_token_ms=0.0, draft_ms=0.0)
    proposer.predicted_gain.clear()  # kept only while recent_chance and the cost stand
    steps(8 * interval + probe + 2)  # the next probe finds drafting pays
    assert all(passes[-2:])
    proposer.step_cost = dear
    proposer.predicted_gain.clear()
    start = len(passes)
    steps(3 * interval + 2 * probe)
    assert _probes(passes[start:]) == ([interval, 3 * interval + probe], [probe, probe])
    assert np.flatnonzero(tracked[start:]).tolist()[:WARM_STEPS] == list(range(WARM_STEPS))


def test_a_warm_up_once_begun_runs_to_its_probe(heads_dir, tiny_target, tiny_target_dir,
                                                tmp_path, monkeypatch):
    """The warm-up's own timing moves the probe's spacing (here each of its calls prices
    the next one differently, as the step clock's running mean does). Every probe still
    comes after WARM_STEPS calls that kept their rows, so its chances count: a probe
    from a colder slot would be discarded, and the pause would never hear from the heads
    again (seen at one request on an Intel Xeon: every probe of a 288-step run wasted)."""
    monkeypatch.setattr(draft_length, "PROBE_SHARE", 0.1)  # probes ten times as close
    dear = StepCost.linear(fixed_ms=10.0, per_token_ms=10.0, draft_ms=1.0)
    dear.save(tmp_path / "dear.json")
    proposer = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "dear.json"))
    tracked, cached, passes, chances = [], [], [], []
    proposer.clock.catch_up_ms = lambda requests: 16.0 + 64.0 * (sum(tracked) % 2)
    table = np.arange(4096, dtype=np.int32)[None] % tiny_target.vocab_size
    for step in range(1200):  # the prompt's 9 rows, then one a step
        _step_of_request_a(proposer, *((0, 9) if step == 0 else (8 + step, 1)), table)
        passes.append(proposer.last_call[2])
        tracked.append(_kept_its_rows(proposer))
        cached.append(proposer.cached_positions("a"))
        chances.append(proposer.recent_chance.copy())
    probes = _probes(passes)[0][1:]
    assert len(probes) >= 3
    for probe in probes:
        assert all(tracked[probe - WARM_STEPS: probe]) and cached[probe] == WARM_STEPS + 1
        # Its chances, and only they, judge the heads.
        assert len(chances[probe]) == 1
        assert not np.allclose(chances[probe - 1][-1], chances[probe])
    assert sum(tracked) == WARM_STEPS * len(probes)  # no warm-up cut short


@pytest.mark.parametrize("sure_steps", [3, 0])
def test_a_probe_is_judged_by_probe_rows_rows(heads_dir, tiny_target, tiny_target_dir,
                                              tmp_path, sure_steps):
    """Four requests, paused, probe: its first step drafts from unsure text (no draft
    would be accepted), the next `sure_steps` from sure text, which pays. A probe drafts
    until PROBE_ROWS rows (four steps of four) judge: three sure steps after the unsure one
    resume drafting, the probes' backoff starting over; four unsure steps keep drafting
    paused, the next probe twice as far. (Judged by its first step alone, the probe
    paused drafting either way.)"""
    assert proposer_module.RECENT_ROWS >= PROBE_ROWS  # else a probe drafts on for good
    StepCost.linear(fixed_ms=10.0, per_token_ms=1.0, draft_ms=1.0).save(tmp_path / "c.json")
    proposer = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "c.json"))
    sure = np.array([0.9, 0.5, 0.2])
    chance = [sure]
    proposer.acceptance.chance = lambda confident, sampled: np.tile(chance[0],
                                                                    (len(confident), 1))
    d, requests = tiny_target.hidden_size, 4
    table = np.arange(4 * 64, dtype=np.int32).reshape(4, 64) % tiny_target.vocab_size
    position = iter(range(64))

    def call() -> bool:
        start = next(position)
        proposer.propose_from_step(StepRows(
            req_ids=list("abcd"), sampled_token_ids=[[5]] * requests,
            hidden_states=torch.randn(requests, d), query_start_loc=np.arange(requests + 1),
            start_positions=np.full(requests, start),
            num_draft_tokens=np.zeros(requests, np.int64), token_ids=table))
        return proposer.last_call[2]

    for _ in range(WARM_STEPS + 1):  # warm slots: their chances judge the heads
        assert call()
    proposer.recent_chance = np.zeros((PROBE_ROWS, 3))  # paused, the probe next
    proposer.predicted_gain.clear()
    proposer.pauses[requests] = Pause(warmed=WARM_STEPS)
    chance[0] = np.zeros(3)
    assert call()  # the probe's first step
    assert len(proposer.recent_chance) == requests
    for step in range(PROBE_ROWS // requests - 1):
        chance[0] = sure if step < sure_steps else np.zeros(3)
        assert call()
    assert len(proposer.recent_chance) == PROBE_ROWS
    if sure_steps:
        assert call() and proposer.pauses[requests].backoff == 1
    else:
        assert not call() and proposer.pauses[requests].backoff == 2


def test_drafting_at_one_batch_size_leaves_the_pause_at_another(heads_dir, tiny_target,
                                                               tiny_target_dir, tmp_path,
                                                               monkeypatch):
    """Drafting pays at one request and never at two. Two requests decode, paused, with
    a step of one between their probes now and then (as when a request ends before the
    next comes in): drafting there leaves the pause at two as it was, so the probes at two
    still back off and no warm-up follows the step of one."""
    monkeypatch.setattr(draft_length, "PROBE_SHARE", 0.1)  # probes ten times as close
    StepCost((1, 2), (10.0, 10.0), (0.0, 10.0), (0.0, 1.0)).save(tmp_path / "cost.json")
    proposer = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "cost.json"))
    proposer.clock.catch_up_ms = lambda requests: 16.0
    interval = probe_interval(2, proposer.step_cost, 16.0)
    d = tiny_target.hidden_size
    table = np.arange(4096, dtype=np.int32).reshape(2, 2048) % tiny_target.vocab_size
    position = iter(range(1, 2048))
    plans = []

    def call(req_ids):
        start = next(position)
        proposer.propose_from_step(StepRows(
            req_ids=req_ids, sampled_token_ids=[[5]] * len(req_ids),
            hidden_states=torch.randn(len(req_ids), d),
            query_start_loc=np.arange(len(req_ids) + 1), start_positions=np.full(
                len(req_ids), start), num_draft_tokens=np.zeros(len(req_ids), np.int64),
            token_ids=table))
        plans.append("D" if proposer.last_call[2] else "T" if _kept_its_rows(proposer)
                     else "S")

    for _ in range(WARM_STEPS + 2):  # warm slots, so their chances judge the heads
        call(["a", "b"])
    calls = 12 * interval
    for i in range(calls):
        call(["a"] if i % (interval // 2) == 0 else ["a", "b"])
    pair = [p for i, p in enumerate(plans[WARM_STEPS + 2:]) if i % (interval // 2)]
    alone = [p for i, p in enumerate(plans[WARM_STEPS + 2:]) if not i % (interval // 2)]
    assert set(alone) == {"D"}
    # The first run of drafting steps at two is the first PROBE_ROWS rows' (no warm-up).
    probes = _probes([plan == "D" for plan in pair])[0]
    assert len(probes) >= 4 and (np.diff(probes) > 1.5 * np.diff(probes)[0]).any()
    assert pair.count("T") == WARM_STEPS * (len(probes) - 1)


def test_only_decode_steps_price_the_warm_up_before_a_probe(heads_dir, tiny_target,
                                                           tiny_target_dir, tmp_path):
    """A probe's catch-up pass over the rows its warm-up kept is timed to price the next
    warm-up, but not when a prompt's rows were kept among them: with such rows the warm-up
    at 16 requests was once priced at 203 ms (a served bench, fp32, AVX-512 BF16 EPYC)
    where one over decode rows takes ~6, which spaced the probes there ~27x too far
    apart."""
    StepCost.linear(fixed_ms=10.0, per_token_ms=10.0, draft_ms=1.0).save(tmp_path / "dear.json")
    proposer = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "dear.json"))
    timed = []
    proposer.clock.record_catch_up = lambda requests, ms: timed.append(requests)
    table = np.arange(2048, dtype=np.int32)[None].repeat(2, 0) % tiny_target.vocab_size

    def call(sampled, rows, starts, pause=None):
        req_ids = ["a", "b"][: len(rows)]
        if pause is not None:  # paused, on PROBE_ROWS rows of chances that do not pay
            proposer.pauses = {size: pause for size in (1, 2)}
            proposer.recent_chance = np.zeros((PROBE_ROWS, proposer.max_drafts))
            proposer.predicted_gain.clear()
        proposer.propose_from_step(StepRows(
            req_ids=req_ids, sampled_token_ids=sampled,
            hidden_states=torch.randn(sum(rows), tiny_target.hidden_size),
            query_start_loc=np.cumsum([0, *rows]), start_positions=np.array(starts),
            num_draft_tokens=np.zeros(len(rows), np.int64), token_ids=table))
        return "draft" if proposer.last_call[2] else "keep" if _kept_its_rows(proposer) else ""

    assert call([[5]], [9], [0]) == "draft"  # the first pass
    # As where drafting paid right before: the pause's first calls keep their rows.
    assert call([[5], []], [1, 20], [9, 0], Pause(after_drafting=True)) == "keep"  # b's prompt
    assert call([[5], [6]], [1, 1], [10, 20], Pause(warmed=WARM_STEPS)) == "draft"
    assert timed == []
    assert call([[5], [6]], [1, 1], [11, 21], Pause(after_drafting=True)) == "keep"
    assert call([[5], [6]], [1, 1], [12, 22], Pause(warmed=WARM_STEPS)) == "draft"
    assert timed == [2]


@pytest.mark.parametrize("num_stages", [2, 0])
def test_only_slots_with_context_judge_the_heads(num_stages, tiny_target, tiny_target_dir,
                                                 tmp_path):
    """A request whose slot restarted drafts from fewer than WARM_STEPS positions: its
    chances are not kept for the pause decision until its slot holds more. Stage-less
    (Medusa-mode) heads keep no context, but count positions the same way."""
    heads = tmp_path / "heads"
    save_checkpoint(draft_model(tiny_target, randomised=True, num_stages=num_stages), heads)
    StepCost.linear(fixed_ms=10.0, per_token_ms=0.0, draft_ms=0.0).save(tmp_path / "c.json")
    proposer = _proposer(heads, tiny_target_dir, step_cost=str(tmp_path / "c.json"))
    d = tiny_target.hidden_size
    table = np.arange(64, dtype=np.int32)[None] % tiny_target.vocab_size
    kept = []
    for position in range(20, 20 + WARM_STEPS + 2):  # no prompt: the slot starts here
        proposer.propose_from_step(StepRows(
            req_ids=["a"], sampled_token_ids=[[5]], hidden_states=torch.randn(1, d),
            query_start_loc=np.array([0, 1]), start_positions=np.array([position]),
            num_draft_tokens=np.zeros(1, np.int64), token_ids=table))
        kept.append(len(proposer.recent_chance))
    assert kept == [0] * WARM_STEPS + [1, 2]
    assert proposer.cached_positions("a") == WARM_STEPS + 2


def _clocked_proposer(heads_dir, target_dir, folder, chances: list[float] | None = None
                      ) -> AmphistaProposer:
    """A proposer with its step clock on, under StepCost.linear(10, 1, 1) (what
    `_timed_steps` times against); `chances`: every request's chance per position."""
    StepCost.linear(fixed_ms=10.0, per_token_ms=1.0, draft_ms=1.0).save(folder / "cost.json")
    proposer = _proposer(heads_dir, target_dir, step_cost=str(folder / "cost.json"), timed=True)
    if chances is not None:
        proposer.acceptance.chance = lambda confident, sampled: np.tile(chances,
                                                                       (len(confident), 1))
    return proposer


def _timed_steps(proposer, tiny_target, monkeypatch, extra_ms: float,
                 accepted_every: int, steps: int = 200, pace: float = 1.0,
                 first_rejected: int = 0, sampled: bool = False) -> list[bool]:
    """One request decoding `steps` steps under StepCost.linear(10, 1, 1): each step
    verifies the drafts proposed before it and takes `pace` times what the step cost
    predicts, plus `extra_ms` after a draft pass; the first draft is accepted every
    `accepted_every` steps (0: never), except in the first `first_rejected` steps that
    verify drafts; sampled: the request samples (T=1). Returns which steps ran the draft
    pass."""
    sampling = (RequestSampling(temperature=torch.ones(1), top_p=None, top_k=None,
                                generators={}) if sampled else None)
    now = [0.0]
    monkeypatch.setattr(proposer_module, "perf_counter", lambda: now[0])
    d = tiny_target.hidden_size
    table = np.arange(1024, dtype=np.int32)[None] % tiny_target.vocab_size
    passes, drafts, position, verifying = [], 0, 8, 0
    for index in range(steps):
        drafted = proposer.last_call is not None and proposer.last_call[2]
        now[0] += 1e-3 * pace * (11.0 + drafts + (1.0 + extra_ms if drafted else 0.0))
        verifying += drafts > 0
        accepted = int(drafts > 0 and accepted_every > 0 and index % accepted_every == 0
                       and verifying > first_rejected)
        proposal = proposer.propose_from_step(StepRows(
            req_ids=["a"], sampled_token_ids=[[5] * (1 + accepted)],
            hidden_states=torch.randn(1 + drafts, d),
            query_start_loc=np.array([0, 1 + drafts]), start_positions=np.array([position]),
            num_draft_tokens=np.array([drafts]), token_ids=table, sampling=sampling))
        position += 1 + accepted
        drafts = len(proposal.tokens[0])
        passes.append(proposer.last_call[2])
    return passes


@pytest.mark.parametrize("extra_ms", [0.0, 18.0])
def test_drafting_pauses_when_drafting_steps_run_slower_than_the_step_cost(
        heads_dir, tiny_target, tiny_target_dir, tmp_path, monkeypatch, extra_ms):
    """Heads right half the time at position 1 pay under this step cost (1.7 tokens in
    14 ms against 1 in 11), and they draft nearly every step while the steps after a
    pass take what the step cost predicts and yield 1.5 tokens: only a plain step now and
    then, until MIN_TIMED plain steps are timed. When those take 18 ms more (a cost the
    calibration did not see), the proposer's clock notices and drafting pauses, with
    only a probe pass now and then."""
    proposer = _clocked_proposer(heads_dir, tiny_target_dir, tmp_path, [0.5, 0.2, 0.05])
    passes = _timed_steps(proposer, tiny_target, monkeypatch, extra_ms, accepted_every=2)
    if extra_ms == 0.0:
        # Plain steps once the first PROBE_ROWS rows judged drafting, every second one,
        # until MIN_TIMED are timed (one more than that many: the clock's counts decay).
        plain = [i for i, drafted in enumerate(passes) if not drafted]
        assert plain == list(range(plain[0], plain[0] + 2 * len(plain), 2))
        assert draft_length.StepClock.MIN_TIMED <= len(plain) <= 10
        assert plain[0] < WARM_STEPS + PROBE_ROWS
        assert proposer.clock.overhead(1) == pytest.approx(1.0)
        assert proposer.clock.realized_gain(1) > 1.1
    else:
        assert sum(passes) < 40 and proposer.clock.overhead(1) > 1.5


def test_sampled_drafting_steps_are_judged_apart_from_greedy_ones(
        heads_dir, tiny_target, tiny_target_dir, tmp_path, monkeypatch):
    """A sampled request whose drafting steps take 18 ms more than the step cost says
    (q and rejection sampling, which the calibration does not time) pauses drafting for
    sampled traffic; a greedy request after it is judged by greedy steps (none timed
    yet), and drafts."""
    proposer = _clocked_proposer(heads_dir, tiny_target_dir, tmp_path, [0.5, 0.2, 0.05])
    sampled = _timed_steps(proposer, tiny_target, monkeypatch, 18.0, accepted_every=2,
                           sampled=True)
    assert sum(sampled) < 40 and proposer.clock.overhead(1, sampled=True) > 1.5
    assert proposer.clock.overhead(1) == 1.0
    greedy = _timed_steps(proposer, tiny_target, monkeypatch, 0.0, accepted_every=2)
    assert sum(greedy) > 150


def test_a_few_rejected_first_drafts_do_not_pause_drafting_for_good(
        heads_dir, tiny_target, tiny_target_dir, tmp_path, monkeypatch):
    """An engine running 20% under its step cost (in-process, a faster hour), heads 0.6 /
    0.3 / 0.1 sure of their drafts, and the first four steps that verify drafts reject
    them all (the first MT-Bench question does that in every greedy run); after that the
    first draft is accepted every second step, which pays. Drafting goes on: the first
    drafting steps' yields, read against plain steps before they are many, start from
    the model's expectation, so they do not pause it for good."""
    proposer = _clocked_proposer(heads_dir, tiny_target_dir, tmp_path)
    monkeypatch.setattr(proposer_module, "confidence",
                        lambda logits: np.tile([0.6, 0.3, 0.1], (len(logits), 1)))
    passes = _timed_steps(proposer, tiny_target, monkeypatch, 0.0, accepted_every=2,
                          pace=0.8, first_rejected=4)
    assert sum(passes[100:]) > 80
    assert proposer.clock.realized_gain(1) > 1.1


def test_drafting_pauses_where_drafting_steps_yield_less_than_plain_ones(
        heads_dir, tiny_target, tiny_target_dir, tmp_path, monkeypatch):
    """The step cost says drafting pays (confident heads, steps as predicted), but the
    target accepts a draft only every 20th step after a pass: drafting steps yield 1.05
    tokens in over 12/11 of a plain step's time. Once plain steps are timed beside them, the
    step clock's check pauses drafting (probes only); drafts accepted every second step
    keep it drafting."""
    passes = {}
    for every in (20, 2):
        proposer = _clocked_proposer(heads_dir, tiny_target_dir, tmp_path, [0.9, 0.5, 0.2])
        passes[every] = _timed_steps(proposer, tiny_target, monkeypatch, 0.0, every)
        assert proposer.clock.overhead(1) == pytest.approx(1.0)
    assert sum(passes[20][100:]) < 20
    assert all(passes[2][100:])


def test_a_finished_request_takes_what_its_drafts_yielded_with_it(
        heads_dir, tiny_target, tiny_target_dir, tmp_path, monkeypatch):
    """One request whose drafts are all rejected where the model expects them to pay:
    the step clock's check pauses drafting, and each probe that finds it still not
    paying spaces the next further. When it finishes, what its drafting steps yielded
    and the probes' backoff go with it (with one request in flight the reading is that
    request's text), and the next request drafts from the model's word."""
    monkeypatch.setattr(draft_length, "PROBE_SHARE", 0.1)  # probes ten times as close
    proposer = _clocked_proposer(heads_dir, tiny_target_dir, tmp_path, [0.9, 0.5, 0.2])
    passes = _timed_steps(proposer, tiny_target, monkeypatch, 0.0, accepted_every=0)
    assert sum(passes[100:]) < 20 and proposer.clock.realized_gain(1) < 1.0
    assert proposer._plan(1) != proposer_module.DRAFT and proposer.pauses[1].backoff > 1
    proposer.release("a")
    assert proposer.clock.realized_gain(1) is None and proposer.pauses[1].backoff == 1
    assert proposer._plan(1) == proposer_module.DRAFT


def test_sampled_requests_draft_from_q_greedy_ones_argmax(heads_dir, tiny_target,
                                                          tiny_target_dir):
    """A greedy and a sampled request in one step: the greedy one drafts the argmax and
    gets no q; the sampled one's q is a distribution per head (restricted to its top-k)
    that gives its drafted token positive mass. In "argmax" mode nobody gets q."""
    d, vocab = tiny_target.hidden_size, tiny_target.vocab_size
    hidden = torch.randn(16, d, generator=torch.Generator().manual_seed(0))
    table = np.arange(2 * 64, dtype=np.int32).reshape(2, 64) % vocab

    def step(proposer, sampling):
        return proposer.propose_from_step(StepRows(
            req_ids=["greedy", "sampled"], sampled_token_ids=[[5], [6]],
            hidden_states=hidden, query_start_loc=np.array([0, 8, 16]),
            start_positions=np.zeros(2, np.int64), num_draft_tokens=np.zeros(2, np.int64),
            token_ids=table, sampling=sampling))

    sampling = RequestSampling(temperature=torch.tensor([0.0, 1.5]), top_p=None,
                               top_k=torch.tensor([vocab, 20], dtype=torch.int32),
                               generators={})
    argmax = step(_proposer(heads_dir, tiny_target_dir), None)
    assert argmax.draft_probs is None
    proposal = step(_proposer(heads_dir, tiny_target_dir), sampling)
    assert proposal.tokens[0] == argmax.tokens[0]
    q = proposal.draft_probs
    assert q.shape == (2, 3, vocab) and not q[0].any()
    torch.testing.assert_close(q[1].sum(-1), torch.ones(3))
    assert ((q[1] > 0).sum(-1) == 20).all()
    assert all(q[1, k, token] > 0 for k, token in enumerate(proposal.tokens[1]))
    assert step(_proposer(heads_dir, tiny_target_dir, draft_sampling="argmax"),
                sampling).draft_probs is None


@needs_bf16_packing
def test_bf16_drafting_prepacks_every_weight_matrix(heads_dir, tiny_target_dir):
    proposer = _proposer(heads_dir, tiny_target_dir, draft_dtype="bfloat16")
    assert proposer.model.packed_lm_head is not None
    assert not any(isinstance(m, torch.nn.Linear) for m in proposer.model.modules())


def test_bf16_drafting_without_onednn_bf16_keeps_plain_weights(
        heads_dir, tiny_target_dir, monkeypatch):
    """An AVX2-only CPU: oneDNN cannot pack bf16 weights (the reorder raises there), so a
    bf16 draft model is left as it is and drafts."""
    monkeypatch.setattr(packed_linear._OPS, "_is_mkldnn_bf16_supported", lambda: False)
    proposer = _proposer(heads_dir, tiny_target_dir, draft_dtype="bfloat16")
    assert proposer.model.packed_lm_head is None
    assert any(isinstance(m, torch.nn.Linear) for m in proposer.model.modules())
    logits = proposer.model.extend(proposer.model.new_cache(),
                                   torch.randn(3, proposer.model.config.hidden_size,
                                               dtype=torch.bfloat16),
                                   torch.tensor([1, 2, 3]), [3])
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


def test_too_many_speculative_tokens(heads_dir, tiny_target_dir):
    with pytest.raises(ValueError, match="num_speculative_tokens=5 exceeds the 4 heads"):
        _proposer(heads_dir, tiny_target_dir, num_tokens=5)


def test_direct_propose_call_explains_missing_patch(heads_dir, tiny_target_dir):
    with pytest.raises(RuntimeError, match="runner patch"):
        _proposer(heads_dir, tiny_target_dir).propose([[1]], None, None)


def test_resolve_translates_to_custom_class(heads_dir, tiny_target, tiny_target_dir):
    spec, settings = resolve_speculative_config(
        {"method": "amphista", "model": str(heads_dir), "num_speculative_tokens": 2,
         "disable_by_batch_size": 8},
        str(tiny_target_dir), tiny_target.hidden_size, tiny_target.vocab_size)
    assert spec == {"method": "custom_class", "num_speculative_tokens": 2,
                    "model": "vllm_amphista.serving.proposer.AmphistaProposer"}
    assert settings == {"heads": str(heads_dir.resolve()), "disable_by_batch_size": 8,
                        "draft_sampling": "sample", "draft_dtype": "auto", "step_cost": "auto",
                        "choose_heads": False}
    spec, settings = resolve_speculative_config(
        {"method": "amphista", "model": str(heads_dir)}, str(tiny_target_dir),
        tiny_target.hidden_size, tiny_target.vocab_size)
    # Default: room for the heads' K, the proposer drafting those that pay.
    assert spec["num_speculative_tokens"] == 4 and settings["choose_heads"]


@pytest.mark.parametrize("spec, message", [
    ({"method": "amphista"}, "needs 'model'"),
    ({"method": "amphista", "model": "/nonexistent/heads"}, "does not exist"),
    ({"method": "amphista", "num_speculative_tokens": 9}, r"num_speculative_tokens=9 .* 4 heads"),
    ({"method": "amphista", "num_speculative_tokens": 0}, "allowed 1..4"),
    ({"method": "amphista", "disable_by_batch_size": 0}, "must be a positive integer"),
    ({"method": "amphista", "disable_by_batch_size": "8"}, "must be a positive integer"),
    ({"method": "amphista", "draft_sampling": "top1"}, "must be one of sample, argmax"),
    ({"method": "amphista", "draft_dtype": "fp16"}, "must be auto, float32 or bfloat16"),
    ({"method": "amphista", "step_cost": "/nowhere.json"}, "must be auto, off or a file"),
])
def test_resolve_rejects_bad_requests(heads_dir, tiny_target, tiny_target_dir, spec, message):
    if "model" not in spec and message != "needs 'model'":
        spec = {**spec, "model": str(heads_dir)}
    with pytest.raises(AmphistaSetupError, match=message):
        resolve_speculative_config(spec, str(tiny_target_dir), tiny_target.hidden_size,
                                   tiny_target.vocab_size)


def test_resolve_rejects_heads_for_another_target(heads_dir, tiny_target, tiny_target_dir):
    with pytest.raises(AmphistaSetupError, match=r"vocab_size=512; target .* vocab_size=1000"):
        resolve_speculative_config({"method": "amphista", "model": str(heads_dir)},
                                   "/not/a/local/dir", tiny_target.hidden_size, 1000)


def test_draft_lengths_follow_the_step_cost(heads_dir, tiny_target, tiny_target_dir, tmp_path):
    """With a calibration file, each request's drafts are cut to choose_lengths' answer
    for the step's chances; a step cost where verifying is free keeps all K."""
    d = tiny_target.hidden_size
    hidden = torch.randn(24, d, generator=torch.Generator().manual_seed(3))
    table = np.arange(3 * 64, dtype=np.int32).reshape(3, 64) % tiny_target.vocab_size
    rows = StepRows(req_ids=["a", "b", "c"], sampled_token_ids=[[5], [6], [7]],
                    hidden_states=hidden, query_start_loc=np.array([0, 8, 16, 24]),
                    start_positions=np.zeros(3, np.int64),
                    num_draft_tokens=np.zeros(3, np.int64), token_ids=table)
    costly = StepCost.linear(10.0, 4.0, 0.0)  # each verified token costs 40% of a step
    costly.save(tmp_path / "costly.json")
    free = StepCost.linear(10.0, 0.0, 0.0)
    free.save(tmp_path / "free.json")
    proposer = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "costly.json"))
    cut = proposer.propose_from_step(rows).tokens
    logits = proposer.model.extend(proposer.model.new_cache(), hidden,
                                   torch.from_numpy(table[[0] * 8 + [1] * 8 + [2] * 8,
                                                          list(range(1, 9)) * 3]).long(),
                                   np.array([8, 8, 8]))[:, :3]
    want = choose_lengths(confidence(logits), costly)
    assert [len(t) for t in cut] == want and want != [3, 3, 3]
    full = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "free.json"))
    assert [len(t) for t in full.propose_from_step(rows).tokens] == [3, 3, 3]
    # Sampled requests: drafts are drawn, and q built, only where they are verified. A
    # cost that cuts the drafts unevenly, none to all three.
    chance = confidence(logits)
    mixed = next(cost for cost in (StepCost.linear(10.0, 10.0 ** e, 0.0)
                                   for e in np.linspace(-4, 1, 2001))
                 if 0 < max(n := choose_lengths(chance, cost)) < 3 and min(n) < max(n))
    mixed.save(tmp_path / "mixed.json")
    want = choose_lengths(chance, mixed)
    rows.sampling = RequestSampling(temperature=torch.ones(3), top_p=None, top_k=None,
                                    generators={})
    sampled = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "mixed.json"))
    proposal = sampled.propose_from_step(rows)
    assert [len(t) for t in proposal.tokens] == want
    q = proposal.draft_probs
    assert q.shape == (3, max(want), tiny_target.vocab_size)
    assert sampled.model.draft_to_target is None  # the tiny heads draft the whole vocabulary
    for i, n in enumerate(want):  # each request's own q, where a request before it has none
        torch.testing.assert_close(q[i, :n], torch.softmax(logits[i, :n].float(), -1))
        assert not q[i, n:].any()
    assert 0 in want[:-1] and want[-1]
    # Every request drafts all three: q's rows are the batch's, each request's own.
    whole = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "free.json"))
    torch.testing.assert_close(whole.propose_from_step(rows).draft_probs,
                               torch.softmax(logits.float(), -1))


def test_drafting_fewer_tokens_than_heads_runs_and_prices_only_their_heads(
        heads_dir, tiny_target_dir, tmp_path):
    """num_speculative_tokens=2 of 4 heads over 2 stages: the model drafts the first two
    heads from the first stage (one stage cached), and the step cost prices that pass,
    where its calibration timed it (else the whole pass)."""
    path = tmp_path / "cost.json"
    StepCost.linear(10.0, 1.0, 4.0).save(
        path, draft_share_by_heads={count: [count / 4] for count in range(1, 5)})
    old = tmp_path / "old.json"
    StepCost.linear(10.0, 1.0, 5.0).save(old)
    for tokens, draft_ms in ((2, 2.0), (4, 4.0)):
        proposer = _proposer(heads_dir, tiny_target_dir, num_tokens=tokens,
                             step_cost=str(path))
        assert proposer.model.drafted_heads == tokens
        assert proposer.step_cost.draft_ms(1) == draft_ms
        assert proposer.model.new_cache().keys.shape[0] == (1 if tokens == 2 else 2)
        assert _proposer(heads_dir, tiny_target_dir, num_tokens=tokens,
                         step_cost=str(old)).step_cost.draft_ms(1) == 5.0


def test_heads_whose_part_of_the_pass_does_not_pay_are_not_drafted(
        heads_dir, tiny_target_dir, tmp_path):
    """Where num_speculative_tokens was not given, with a step cost whose second SAL
    stage doubles the pass and heads whose held-out top-1 (metrics.json) falls off, the
    proposer drafts the first two heads, from one cached stage, priced as that pass;
    without the accuracy record, without a step cost, or where the user chose the count
    (3 here), it drafts that many."""
    path = tmp_path / "cost.json"
    StepCost.linear(10.0, 0.5, 2.0).save(
        path, draft_share_by_heads={1: [0.3], 2: [0.5], 3: [1.0], 4: [1.0]})
    full = _proposer(heads_dir, tiny_target_dir, step_cost=str(path), choose_heads=True)
    assert full.max_drafts == full.model.drafted_heads == 3
    (heads_dir / METRICS_FILE).write_text(json.dumps(
        {"history": [{"eval": {"top1": [0.5, 0.3, 0.2, 0.15]}}]}))
    cut = _proposer(heads_dir, tiny_target_dir, step_cost=str(path), choose_heads=True)
    assert cut.max_drafts == cut.model.drafted_heads == 2
    assert cut.step_cost.draft_ms(1) == 1.0 and cut.model.new_cache().keys.shape[0] == 1
    assert cut.acceptance.expected.shape[1] == cut.recent_chance.shape[1] == 2
    assert _proposer(heads_dir, tiny_target_dir, step_cost=str(path)).max_drafts == 3
    assert _proposer(heads_dir, tiny_target_dir, step_cost="off",
                     choose_heads=True).max_drafts == 3
    (heads_dir / METRICS_FILE).write_text("{not json")
    assert _proposer(heads_dir, tiny_target_dir, step_cost=str(path),
                     choose_heads=True).max_drafts == 3


def test_calibration_times_the_pass_of_each_count_of_leading_heads(
        heads_dir, tiny_target_dir, monkeypatch):
    drafted = []
    extend = AmphistaDraftModel.extend

    def recording(model, *args, **kwargs):
        drafted.append(model.drafted_heads)
        return extend(model, *args, **kwargs)

    monkeypatch.setattr(AmphistaDraftModel, "extend", recording)
    rows = measure_draft_pass(tiny_target_dir, heads_dir, torch.float32, [1, 3],
                              each_head_count=True, context=8, repeats=1)
    assert [(row["heads"], row["requests"]) for row in rows] == [
        (heads, requests) for heads in range(1, 5) for requests in (1, 3)]
    assert all(row["ms"] > 0 for row in rows) and set(drafted) == {1, 2, 3, 4}


def test_requests_beside_a_partial_prefill_draft_from_their_own_rows(heads_dir, tiny_target,
                                                                    tiny_target_dir):
    """A request in the middle of its prompt (no sampled token: no drafts) between two
    that decode: each of those drafts the argmax of its own logits."""
    hidden = torch.randn(24, tiny_target.hidden_size, generator=torch.Generator().manual_seed(4))
    table = np.arange(3 * 64, dtype=np.int32).reshape(3, 64) % tiny_target.vocab_size
    rows = StepRows(req_ids=["a", "prefilling", "c"], sampled_token_ids=[[5], [], [7]],
                    hidden_states=hidden, query_start_loc=np.array([0, 8, 16, 24]),
                    start_positions=np.zeros(3, np.int64),
                    num_draft_tokens=np.zeros(3, np.int64), token_ids=table)
    proposer = _proposer(heads_dir, tiny_target_dir)
    tokens = proposer.propose_from_step(rows).tokens
    logits = proposer.model.extend(proposer.model.new_cache(), hidden,
                                   torch.from_numpy(table[[0] * 8 + [1] * 8 + [2] * 8,
                                                          list(range(1, 9)) * 3]).long(),
                                   np.array([8, 8, 8]))[:, :3]
    assert proposer.model.draft_to_target is None  # draft ids are the target's
    assert tokens == [logits[0].argmax(-1).tolist(), [], logits[2].argmax(-1).tolist()]
    assert tokens[0] != tokens[2]


def _rows(query_start_loc: list[int], verified: list[int], sampled: list[list[int]],
          temperature: list[float] | None = None) -> StepRows:
    """A step's rows for the row-count checks (hidden states and tokens unread)."""
    count = len(verified)
    return StepRows(
        req_ids=[f"r{i}" for i in range(count)], sampled_token_ids=sampled,
        hidden_states=torch.zeros(query_start_loc[-1], 4),
        query_start_loc=np.array(query_start_loc), start_positions=np.zeros(count, np.int64),
        num_draft_tokens=np.array(verified), token_ids=np.zeros((count, 8), np.int32),
        sampling=None if temperature is None else RequestSampling(
            temperature=torch.tensor(temperature), top_k=None, top_p=None, generators={}))


def test_step_rows_count_what_each_request_ran_and_kept():
    """A decode with two verified drafts, one accepted (3 rows), beside a prefill chunk
    of 4 rows (no token yet) and a plain decode: the prefill chunk keeps every row and
    makes the step other than decode-only, which only decode steps are timed as."""
    mixed = _rows([0, 3, 7, 8], [2, 0, 0], [[5, 6], [], [9]])
    assert mixed.accepted_counts().tolist() == [2, 4, 1]
    assert mixed.prefilling().tolist() == [False, True, False]
    assert mixed.rows_run() == 8 and not mixed.decode_only()
    # A one-row prefill chunk runs as a decode does: the step times as decode-only.
    assert _rows([0, 3, 4], [2, 0], [[5, 6], []]).decode_only()
    assert _rows([0, 3, 4], [2, 0], [[5, 6], [9]]).decode_only()


@pytest.mark.parametrize("temperature, sampled", [
    (None, [False, False]), ([0.0, 0.0], [False, False]), ([0.0, 0.7], [False, True])])
def test_step_rows_say_which_requests_sample(temperature, sampled):
    rows = _rows([0, 1, 2], [0, 0], [[1], [2]], temperature)
    assert rows.sampled_requests().tolist() == sampled
    assert rows.any_sampled() == any(sampled)


def test_each_kind_of_bf16_cpu_has_its_own_shipped_step_cost(heads_dir):
    kinds = [frozenset({"avx2"}), frozenset({"avx512_bf16"}),
             frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})]
    paths = [shipped_step_cost_path(heads_dir, "bfloat16", CpuInfo("CPU", flags))
             for flags in kinds]
    assert [p.name for p in paths] == ["step_cost-bfloat16-no-native-bf16.json",
                                       "step_cost-bfloat16-native-bf16.json",
                                       "step_cost-bfloat16-amx-bf16.json"]


def test_auto_step_cost_is_this_machines_else_the_one_shipped_with_the_heads(
        heads_dir, tiny_target_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(draft_length, "STEP_COST_DIR", tmp_path / "machine")
    caplog.set_level(logging.INFO, logger="vllm.amphista")
    logging.getLogger("vllm.amphista").addHandler(caplog.handler)  # vLLM stops propagation
    try:
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto").step_cost is None
        other_kind = CpuInfo("Other CPU", frozenset() if cpu_info().native_bf16
                             else frozenset({"avx512_bf16"}))
        StepCost.linear(1.0, 1.0, 1.0).save(
            shipped_step_cost_path(heads_dir, "float32", other_kind))
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto").step_cost is None
        shipped = StepCost.linear(10.0, 1.0, 2.0)
        shipped.save(shipped_step_cost_path(heads_dir, "torch.float32"),
                     machine={"cpu": "Reference CPU", "bf16_flags": ["avx512_bf16"]})
        shipped.save(shipped_step_cost_path(heads_dir, "bfloat16"))  # another dtype's
        caplog.clear()
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto").step_cost == shipped
        assert "shipped with the heads" in caplog.text
        assert "measured on Reference CPU (avx512_bf16)" in caplog.text
        # Measured with another thread count: not this engine's.
        StepCost.linear(30.0, 5.0, 6.0).save(step_cost_path(
            tiny_target_dir, "torch.float32", threads=torch.get_num_threads() + 1))
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto").step_cost == shipped
        own = StepCost.linear(20.0, 3.0, 4.0)
        own.save(step_cost_path(tiny_target_dir, "torch.float32"))
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto").step_cost == own
        assert _proposer(heads_dir, tiny_target_dir, step_cost="off").step_cost is None
        # A compiled target: the eager engine's files are not its own; the shipped eager
        # one is its start until one for compiled targets is shipped, then that one.
        caplog.clear()
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto",
                         compiled=True).step_cost == shipped
        assert "its target compiled" in caplog.text and "its target eager" in caplog.text
        shipped_compiled = StepCost.linear(7.0, 1.0, 2.0)
        shipped_compiled.save(shipped_step_cost_path(heads_dir, "float32", compiled=True))
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto",
                         compiled=True).step_cost == shipped_compiled
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto").step_cost == own
        own_compiled = StepCost.linear(9.0, 1.0, 2.0)
        own_compiled.save(step_cost_path(tiny_target_dir, "torch.float32", compiled=True))
        assert _proposer(heads_dir, tiny_target_dir, step_cost="auto",
                         compiled=True).step_cost == own_compiled
    finally:
        logging.getLogger("vllm.amphista").removeHandler(caplog.handler)


@pytest.mark.parametrize("accepted", [0, 3])
def test_the_drafts_the_target_verified_correct_the_chances(heads_dir, tiny_target,
                                                            tiny_target_dir, tmp_path,
                                                            accepted):
    """A step proposes 3 drafts for "a"; the next step reports how many of them the target
    accepted, and the proposer's chance for that confidence moves towards it: down where
    all were rejected, up where all were accepted."""
    StepCost.linear(10.0, 0.0, 0.0).save(tmp_path / "free.json")  # all K every step
    proposer = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "free.json"))
    d = tiny_target.hidden_size
    table = np.arange(64, dtype=np.int32)[None] % tiny_target.vocab_size
    hidden = torch.randn(8, d, generator=torch.Generator().manual_seed(5))
    drafts = proposer.propose_from_step(StepRows(
        req_ids=["a"], sampled_token_ids=[[8]], hidden_states=hidden,
        query_start_loc=np.array([0, 8]), start_positions=np.zeros(1, np.int64),
        num_draft_tokens=np.zeros(1, np.int64), token_ids=table)).tokens
    assert len(drafts[0]) == 3
    confident = proposer.draft_confidence[:1].copy()
    before = proposer.acceptance.chance(confident)
    proposer.propose_from_step(StepRows(
        req_ids=["a"], sampled_token_ids=[list(range(9, 10 + accepted))],
        hidden_states=hidden[:4], query_start_loc=np.array([0, 4]),
        start_positions=np.array([8]), num_draft_tokens=np.array([3]), token_ids=table))
    after = proposer.acceptance.chance(confident)
    if accepted:
        assert (after > before).all()
    else:
        assert (after < before).all()


def test_greedy_and_sampled_requests_teach_their_own_chances(heads_dir, tiny_target,
                                                             tiny_target_dir, tmp_path):
    """A greedy and a sampled request in one batch each draft 3 tokens; the next step
    reports all of the greedy one's accepted and none of the sampled one's. The greedy
    chance for that confidence rises and the sampled one falls: the verdicts land on
    their own kind."""
    StepCost.linear(10.0, 0.0, 0.0).save(tmp_path / "free.json")  # all K every step
    proposer = _proposer(heads_dir, tiny_target_dir, step_cost=str(tmp_path / "free.json"))
    d, vocab = tiny_target.hidden_size, tiny_target.vocab_size
    hidden = torch.randn(16, d, generator=torch.Generator().manual_seed(6))
    table = np.arange(2 * 64, dtype=np.int32).reshape(2, 64) % vocab
    sampling = RequestSampling(temperature=torch.tensor([0.0, 0.7]), top_p=None, top_k=None,
                               generators={})
    drafts = proposer.propose_from_step(StepRows(
        req_ids=["greedy", "sampled"], sampled_token_ids=[[5], [6]], hidden_states=hidden,
        query_start_loc=np.array([0, 8, 16]), start_positions=np.zeros(2, np.int64),
        num_draft_tokens=np.zeros(2, np.int64), token_ids=table, sampling=sampling)).tokens
    assert [len(t) for t in drafts] == [3, 3]
    confident = proposer.draft_confidence[:2].copy()
    kinds = np.array([False, True])
    before = [proposer.acceptance.chance(confident, np.full(2, kind)) for kind in kinds]
    proposer.propose_from_step(StepRows(
        req_ids=["greedy", "sampled"], sampled_token_ids=[[9, 10, 11, 12], [13]],
        hidden_states=hidden[:8], query_start_loc=np.array([0, 4, 8]),
        start_positions=np.array([8, 8]), num_draft_tokens=np.array([3, 3]),
        token_ids=table, sampling=sampling))
    greedy, sampled = (proposer.acceptance.chance(confident, np.full(2, kind))
                       for kind in kinds)
    assert (greedy > before[0]).all()
    assert (sampled < before[1]).all()
