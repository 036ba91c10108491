"""AmphistaProposer: drafts K tokens per request inside vLLM's model runner.

vLLM 0.32 builds it through the `custom_class` hook. That hook
passes no hidden states, so serving/patches.py routes the runner's
`propose_draft_token_ids` to `propose_from_step`, which gets, for each
request, the target's hidden-state rows of this step and where they sit.

The SAL keys and values of every accepted position live in one SALCache whose slot i
is the runner's batch row i: the draft pass reads slots 0..B-1 in place. When vLLM
reorders its batch (a request finished, another moved into its row) the moved
requests' slots are moved with them; that is the only copy. A step's rows for request
i start at absolute position s_i; the rows whose KV the target kept are the prefill
chunk, or in a decode step the last sampled token plus the accepted drafts
(StepRows.accepted_counts). Row t pairs with the next token x_{t+1}, read from the
runner's token table, which already holds this step's accepted tokens. A request whose
rows do not start where its slot ended (preemption, a prefix-cache hit, a pause)
restarts its slot: RoPE attention is shift-invariant, so that is sound, but its drafts
are worse until the slot holds some context again, so a paused proposer keeps the rows
of a few steps before it probes (serving/draft_length.py, WARM_STEPS), and the probe's
pass runs the SAL layers over them first (serving/pending_rows.py). A chunk of more
than PROMPT_TAIL rows (a long prompt) restarts its slot with only its last PROMPT_TAIL
rows, and a slot keeps at most that many rows waiting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import NamedTuple

import numpy as np
import torch

from vllm_amphista.kernels.argmax import last_dim_argmax
from vllm_amphista.machine import openmp_runtime, resolve_dtype
from vllm_amphista.model.checkpoint import check_target, held_out_top1, load_checkpoint
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.sal_cache import SALCache
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.serving.draft_length import (
    MAX_PROBE_BACKOFF,
    WARM_STEPS,
    AcceptanceTracker,
    StepClock,
    StepCost,
    choose_lengths,
    compiled_target,
    confidence,
    drafting_gain,
    heads_that_pay,
    probe_interval,
    probe_rows,
    shipped_step_cost_path,
    step_cost_path,
)
from vllm_amphista.serving.draft_sampling import (
    DraftSampling,
    draft_distribution,
    sample_drafts,
)
from vllm_amphista.serving.pending_rows import PendingRows
from vllm_amphista.serving.spec_config import ADDITIONAL_CONFIG_KEY, DEFAULT_DRAFT_SAMPLING
from vllm_amphista.serving.step import Proposal, StepDrafter, StepRows
from vllm_amphista.serving.warm_up import warm_products, warm_token_counts

# A child of vLLM's logger, so our lines appear with vLLM's own, formatted alike.
logger = logging.getLogger("vllm.amphista")
# Drafting requests' chances kept to judge whether drafting pays at a batch size; at
# least PROBE_ROWS, which `_plan` drafts until it has (a probe that could never gather
# them would draft on for good).
RECENT_ROWS = 32
# The most rows of one step a slot takes through the SAL layers: of a longer prompt (or
# prefill chunk) only the last ones, the slot restarting there. The SAL layers over a
# whole prompt cost more than linearly in its length (bf16, one thread, AMD EPYC with
# avx512_bf16: 7 ms for 64 rows, 26 for 256, 452 for 2048), while the drafts gain little
# from context that far back: the heads' chain tau with every position cached 1.770,
# with only the last 32 1.715 (`python -m benchmarks.sal_context`, docs/results.md).
PROMPT_TAIL = 128
# What a call does (AmphistaProposer._plan): the draft pass and drafts; keep the step's
# rows for the next pass's SAL layers (PendingRows), so the caches follow the requests;
# nothing.
DRAFT, TRACK, SKIP = "draft", "track", "skip"


class LastCall(NamedTuple):
    """The proposer's last call, for the step clock to time the step after it: when it
    started, its decoding requests, whether it ran a draft pass, its own time the clock
    takes out of that step (ms: all of a call that only kept its rows, a plain step to
    the clock; a drafting call's catch-up), and whether a request in it samples."""

    started: float
    decoding: int
    drafted: bool
    own_ms: float
    sampled: bool


@dataclass
class Pause:
    """Drafting paused at one batch size: plain steps there since it paused or last
    probed, the probe interval's multiple, whether drafting paid there right before, and
    the calls of the warm-up before the next probe so far."""

    steps: int = 0
    backoff: int = 1
    after_drafting: bool = False
    warmed: int = 0


class AmphistaProposer(StepDrafter):
    def __init__(self, vllm_config) -> None:
        spec = vllm_config.speculative_config
        settings = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if not settings or "heads" not in settings:
            raise ValueError(
                "AmphistaProposer needs speculative_config method 'amphista' with the "
                "heads folder as 'model'")
        self.heads_dir = Path(settings["heads"])
        # Above this many decoding requests a step gets no drafts: verifying K+1 tokens
        # per request costs more than it saves once the target is compute-bound.
        self.disable_by_batch_size: int | None = settings.get("disable_by_batch_size")
        self.draft_sampling: DraftSampling = settings.get("draft_sampling",
                                                          DEFAULT_DRAFT_SAMPLING)
        self.target_dir = Path(vllm_config.model_config.model)
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.device = torch.device(vllm_config.device_config.device)
        # The draft model's own compute dtype (machine.py), whatever the target's: the
        # target's hidden states are cast to it.
        self.dtype = resolve_dtype(settings.get("draft_dtype"), self.device)
        self.tensor_parallel_size = vllm_config.parallel_config.tensor_parallel_size
        self.model: AmphistaDraftModel = load_checkpoint(self.heads_dir, dtype=self.dtype)
        self.model.to(self.device)
        if self.num_speculative_tokens > self.model.config.num_heads:
            raise ValueError(
                f"num_speculative_tokens={self.num_speculative_tokens} exceeds the "
                f"{self.model.config.num_heads} heads in {self.heads_dir}")
        step_cost = self._step_cost_file(settings.get("step_cost", "auto"),
                                         vllm_config.model_config.dtype,
                                         compiled_target(vllm_config))
        # The heads drafted: num_speculative_tokens where the user set it, else those
        # that pay for their part of the pass here.
        self.max_drafts = (self._heads_to_draft(step_cost) if settings.get("choose_heads")
                           else self.num_speculative_tokens)
        self.model.draft_leading_heads(self.max_drafts)
        scheduler = vllm_config.scheduler_config
        self.target_dtype: torch.dtype = vllm_config.model_config.dtype
        self.warmed_shapes: dict[str, int] = {}  # by model, once load_model warmed them
        self.warm_counts = warm_token_counts(self.max_drafts, scheduler.max_num_seqs,
                                             scheduler.max_num_batched_tokens)
        self.step_cost = StepCost.load(step_cost, self.max_drafts) if step_cost else None
        logger.info("amphista: drafting up to %d tokens per step with the heads in %s "
                    "(draft dtype %s)", self.max_drafts, self.heads_dir,
                    str(self.dtype).removeprefix("torch."))
        # Recent drafting requests' chances (rows, newest last): what tells a paused
        # proposer whether drafting would pay at the current batch size.
        self.recent_chance = np.zeros((0, self.max_drafts))
        # drafting_gain per number of decoding requests, from recent_chance as it is: a
        # paused proposer asks every step, and recent_chance changes only when it drafts.
        self.predicted_gain: dict[int, float] = {}
        self.acceptance = AcceptanceTracker(self.max_drafts)
        self.pauses: dict[int, Pause] = {}  # per number of decoding requests
        self.steps_drafting = 0  # steps drafting paid, for timing plain ones among them
        self.clock = StepClock(self.step_cost.batch_sizes if self.step_cost else (1,))
        self.last_call: LastCall | None = None
        self.cache: SALCache | None = None  # created at the first step, dropped when idle
        self.pending: PendingRows | None = None  # created and dropped with the cache
        self.slot_reqs: list[str | None] = []  # the request in each slot
        self.next_position = np.zeros(0, np.int64)  # per slot: where its next rows start
        # Per slot: the heads' confidence in the drafts proposed last step, scored against
        # what the target accepted in the next.
        self.draft_confidence = np.zeros((0, self.max_drafts))

    def _step_cost_file(self, setting: str, target_dtype, compiled: bool) -> Path | None:
        """"auto": this machine's calibration for this engine (its target compiled or
        not), else the one shipped with the heads for this kind of CPU, for such an
        engine where there is one, else for the other (a compiled target's plain steps
        are shorter: a start, not this engine's figures)."""
        if setting == "off":
            return None
        if setting != "auto":
            path = Path(setting)
        else:
            path = step_cost_path(self.target_dir, str(target_dtype), compiled=compiled)
            shipped = [file for mode in (compiled, not compiled)
                       if (file := shipped_step_cost_path(self.heads_dir, str(target_dtype),
                                                          compiled=mode)).is_file()]
            if not path.is_file() and shipped:
                logger.info("amphista: draft lengths chosen per step from the step cost "
                            "shipped with the heads (%s, measured on %s; this engine "
                            "computes with %d, %s OpenMP, its target %s); `vllm-amphista "
                            "calibrate` measures this machine's", shipped[0],
                            StepCost.measured_on(shipped[0]), torch.get_num_threads(),
                            openmp_runtime(), "compiled" if compiled else "eager")
                return shipped[0]
        if not path.is_file():
            logger.info("amphista: no step-cost calibration for this machine and target "
                        "(%s): verifying all %d drafts every step. `vllm-amphista "
                        "calibrate` measures it.", path, self.num_speculative_tokens)
            return None
        logger.info("amphista: draft lengths chosen per step from the step cost in %s", path)
        return path

    def _heads_to_draft(self, step_cost: Path | None) -> int:
        """The heads' K, or fewer leading heads where the step cost and the heads'
        held-out accuracy (training's metrics) say the rest cost more than they yield
        (`heads_that_pay`). Without either: all of them."""
        allowed = self.num_speculative_tokens
        top1 = held_out_top1(self.heads_dir, self.model.config.num_heads)
        if step_cost is None or top1 is None:
            return allowed
        heads, gains = heads_that_pay(top1[:allowed],
                                      lambda count: StepCost.load(step_cost, count))
        logger.info("amphista: drafting the first %d of %d heads: tokens per unit of time "
                    "over plain steps, expected from the step cost and the heads' "
                    "held-out top-1, drafting 1..%d heads: %s", heads, allowed, allowed,
                    " ".join(f"{g:.3f}" for g in gains))
        return heads

    # -- vLLM's custom_class interface ---------------------------------------------------
    def load_model(self, target_model: torch.nn.Module) -> None:
        """Attach the target's frozen embedding and lm_head (called by the runner), then
        prepack the draft model's weights for drafting on a CPU (kernels/packed_linear.py)
        and warm the products drafting steps run (serving/warm_up.py)."""
        target = None
        if self.tensor_parallel_size == 1:
            target = self._weights_from_vllm_model(target_model)
        if target is None:  # vocab-sharded weights or an unknown layout: read the files
            target = TargetWeights.from_folder(self.target_dir)
        check_target(self.model.config, target, self.heads_dir)
        self.model.attach_target(target)
        self.model.to(self.device)
        self.model.pack_for_drafting()
        if self.device.type == "cpu":
            self.warmed_shapes = warm_products(target_model, self.model, self.warm_counts,
                                               self.target_dtype, self.dtype)

    def _weights_from_vllm_model(self, target_model: torch.nn.Module) -> TargetWeights | None:
        vocab = self.model.config.vocab_size
        embed = getattr(getattr(target_model, "model", None), "embed_tokens", None)
        head = getattr(target_model, "lm_head", None)
        if embed is None or head is None or embed.weight.shape[0] < vocab:
            return None
        return TargetWeights(name=self.target_dir.name, hidden_size=embed.weight.shape[1],
                             vocab_size=vocab, embed_tokens=embed.weight[:vocab],
                             lm_head=head.weight[:vocab])

    # -- the real entry point ------------------------------------------------------------
    def propose_from_step(self, step: StepRows) -> Proposal:
        num_reqs = len(step.req_ids)
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        decoding = sum(1 for s in step.sampled_token_ids if s)
        now = perf_counter()
        if self.step_cost is not None:
            self._time_last_step(step, now)
        any_sampled = step.any_sampled()
        # A step of prompts only is judged at the size its requests will decode at:
        # where drafting is paused there, caches filled now would restart unused.
        plan = self._plan(decoding or num_reqs, any_sampled)
        self.last_call = LastCall(now, decoding, plan == DRAFT, 0.0, any_sampled)
        if plan == SKIP:
            # No pass at all. A skipped request's slot no longer ends where its next rows
            # start, so it restarts when a pass runs again.
            return Proposal(drafts)
        sampled = step.sampled_requests()
        cache = self._follow_batch(step.req_ids)
        if self.step_cost is not None:
            self._score_drafts(step, sampled)
        counts = step.accepted_counts()
        if not counts.any():  # no request ran a row the target kept
            return Proposal(drafts)
        starts = np.asarray(step.start_positions[:num_reqs], np.int64)
        # More rows than PROMPT_TAIL (a prompt): the slot restarts with the last of them.
        skip = np.maximum(counts - PROMPT_TAIL, 0)
        restart = np.flatnonzero((starts != self.next_position[:num_reqs]) | (skip > 0))
        cache.lengths[restart] = 0
        self.pending.clear(restart)
        index, next_tokens = step.accepted_row_index(counts, skip)
        hidden = step.hidden_states[torch.from_numpy(index).to(step.hidden_states.device)]
        hidden = hidden.to(self.device, self.dtype)
        next_tokens = torch.from_numpy(next_tokens).to(self.device)
        self.next_position[:num_reqs] = starts + counts
        if plan == TRACK:
            dropped = self.pending.add(hidden, next_tokens, counts - skip, step.prefilling())
            cache.lengths[dropped] = 0
            self.last_call = self.last_call._replace(own_ms=1e3 * (perf_counter() - now))
            return Proposal(drafts)
        catch_up_ms = self._catch_up(num_reqs, decoding)
        self.last_call = self.last_call._replace(own_ms=catch_up_ms)
        logits = self.model.extend(cache, hidden, next_tokens, counts - skip)
        # Requests past a partial prefill (they sampled a token) get drafts.
        drafting = [i for i in np.flatnonzero(counts).tolist() if step.sampled_token_ids[i]]
        if not drafting:
            return Proposal(drafts)
        if len(drafting) < len(logits):  # else all rows, in order: no copy by index
            logits = logits[drafting]
        # In fp32: CPU reductions over bf16 are slow (AMD EPYC, avx512_bf16, 16 x 4 x
        # 8192 logits: ~2 ms for argmax alone).
        logits = logits.float()
        top_ids = last_dim_argmax(logits)
        lengths = self._lengths(logits, drafting, sampled[drafting])
        # Drafts (and their q) only where some will be verified, up to the longest.
        kept = [j for j, n in enumerate(lengths) if n]
        if not kept:
            return Proposal(drafts)
        rows = [drafting[j] for j in kept]
        longest = max(lengths[j] for j in kept)
        ids, draft_probs = self._choose(logits[:, :longest], kept, top_ids[kept, :longest],
                                        step, rows)
        for i, tokens, j in zip(rows, self.model.to_target_ids(ids).tolist(), kept,
                                strict=True):
            drafts[i] = tokens[: lengths[j]]
        return Proposal(drafts, draft_probs)

    def _plan(self, decoding: int, sampled: bool = False) -> str:
        """What this call does: DRAFT, TRACK or SKIP.
        - Above the user's batch limit: SKIP.
        - With fewer recent chances than `probe_rows` asks (at the start, and in a
          probe): DRAFT.
        - Where drafting pays (the step cost with recent chances, and the step clock's
          check that drafting steps timed at this size, for this step's kind of traffic,
          greedy or sampled, yielded more than plain ones):
          DRAFT, but TRACK every second step until plain steps are timed at this size
          (once per size), so that the check soon has plain steps to compare with.
        - Elsewhere drafting is paused: SKIP, except a probe now and then that measures
          the chances again: it drops the recent ones, so that drafting resumes until
          `probe_rows` new rows judge it, the WARM_STEPS calls before it TRACK so that it
          drafts with context. The first WARM_STEPS calls of a pause that follows
          drafting TRACK as well: near the break-even the verdict may turn back within a
          few steps (the step clock's noise), and drafting then resumes with context.
        A pause is kept per batch size: with 4 requests in flight the batch dips to 3
        for a step or two whenever one ends before the next comes in, and drafting
        there must not restart the pause at 4 with its warm-up and backoff."""
        if self.disable_by_batch_size is not None:
            return SKIP if decoding > self.disable_by_batch_size else DRAFT
        if (self.step_cost is None or decoding == 0
                or len(self.recent_chance) < probe_rows(decoding)):
            return DRAFT
        predicted = self.predicted_gain.get(decoding)
        if predicted is None:
            predicted = drafting_gain(decoding, self.recent_chance, self.step_cost)
            self.predicted_gain[decoding] = predicted
        overhead = self.clock.overhead(decoding, sampled)
        realized = self.clock.realized_gain(decoding, predicted / overhead, sampled)
        if (realized is None or realized >= 1.0) and predicted > overhead:
            self.pauses[decoding] = Pause(after_drafting=True)
            self.steps_drafting += 1
            explore = (not self.clock.plain_timed(decoding, sampled)
                       and self.steps_drafting % 2 == 0)
            return TRACK if explore else DRAFT
        pause = self.pauses.setdefault(decoding, Pause())
        pause.steps += 1
        if pause.after_drafting and pause.steps <= WARM_STEPS:
            return TRACK
        if pause.warmed == WARM_STEPS:
            self.pauses[decoding] = Pause(backoff=min(2 * pause.backoff, MAX_PROBE_BACKOFF))
            # The recent chances are from before the pause, from text that may be long
            # gone (at one request a probe adding one row to 32 left drafting paused for
            # most of a run on the first question's chances).
            self._set_recent_chance(self.recent_chance[:0])
            return DRAFT  # its drafts are still cut to what pays
        if not pause.warmed:
            # Not timed yet: about a draft pass (a catch-up over WARM_STEPS rows reads
            # the same weights once).
            catch_up_ms = self.clock.catch_up_ms(decoding) or self.step_cost.draft_ms(decoding)
            spacing = pause.backoff * probe_interval(decoding, self.step_cost, catch_up_ms)
            if pause.steps <= spacing - WARM_STEPS:
                return SKIP
        # A warm-up, once begun, runs its WARM_STEPS calls to the probe: the spacing moves
        # as catch-up passes are timed, and a probe after fewer calls drafts from slots
        # too cold to judge the heads by (`_lengths`), so its pass would be spent for
        # nothing.
        pause.warmed += 1
        return TRACK

    def _lengths(self, logits: torch.Tensor, rows: list[int], sampled: np.ndarray) -> list[int]:
        """Drafts to verify per drafting request (batch rows `rows`, `sampled` saying
        which of them sample): all K, or the step cost's choice."""
        if self.step_cost is None:
            return [self.max_drafts] * logits.shape[0]
        confident = confidence(logits)
        self.draft_confidence[rows] = confident
        chance = self.acceptance.chance(confident, sampled)
        # Only slots with context judge the heads: a restarted slot drafts worse for a
        # few steps (WARM_STEPS), and its chances would keep drafting paused.
        warm = self.cache.lengths[rows] > WARM_STEPS
        self._set_recent_chance(np.concatenate((self.recent_chance, chance[warm])))
        return choose_lengths(chance, self.step_cost)

    def _set_recent_chance(self, rows: np.ndarray) -> None:
        """Keep the newest RECENT_ROWS of `rows` as the recent chances, and forget the
        gains predicted from the old ones."""
        self.recent_chance = rows[-RECENT_ROWS:]
        self.predicted_gain.clear()

    def _time_last_step(self, step: StepRows, now: float) -> None:
        """Time the last call's work and the engine step that followed it (this step)
        against the step cost's prediction, if this step only decoded (a prefill chunk
        riding along is not in the step cost)."""
        if self.last_call is None or not step.req_ids:
            return
        started, decoded, drafted, own_ms, sampled = self.last_call
        if not step.decode_only():
            return
        num_reqs = len(step.req_ids)
        predicted = float(self.step_cost.step_ms(num_reqs, step.rows_run()))
        if drafted:
            predicted += self.step_cost.draft_ms(max(decoded, 1))
        self.clock.record(num_reqs, drafted, 1e3 * (now - started) - own_ms, predicted,
                          float(self.step_cost.step_ms(num_reqs, num_reqs)),
                          sum(map(len, step.sampled_token_ids[:num_reqs])), sampled)

    def _catch_up(self, num_reqs: int, decoding: int) -> float:
        """Run the SAL layers over the rows that TRACK calls kept (before this step's),
        so the caches hold everything up to this step; returns its time (ms), which the
        step clock takes out of the drafting step and keeps to price a probe's warm-up
        (not when a prompt's rows were among them: a warm-up is decode steps)."""
        if not self.pending.counts[:num_reqs].any():
            return 0.0
        started = perf_counter()
        hidden, next_tokens, counts, from_prompt = self.pending.take(num_reqs)
        self.model.extend(self.cache, hidden, next_tokens, counts, logits=False)
        ms = 1e3 * (perf_counter() - started)
        if not from_prompt:
            self.clock.record_catch_up(decoding, ms)
        return ms

    def _score_drafts(self, step: StepRows, sampled: np.ndarray) -> None:
        """Tell the acceptance tracker how the drafts verified in this step fared (slot i
        holds row i's confidence from the step that proposed them; sampled [num_reqs]:
        which requests sample)."""
        num_reqs = len(step.req_ids)
        verified = step.num_draft_tokens[:num_reqs].tolist()
        if any(verified):
            self.acceptance.record(self.draft_confidence[:num_reqs], verified,
                                   step.accepted_drafts(), sampled)

    def _follow_batch(self, req_ids: list[str]) -> SALCache:
        """Make slot i hold request req_ids[i]: move the slots of requests vLLM moved,
        mark new requests for a restart. Nothing to do while the batch is unchanged."""
        if self.cache is None:
            self.cache = self.model.new_cache()
            self.pending = PendingRows(self.model.config.hidden_size, self.dtype, self.device,
                                       PROMPT_TAIL)
        if req_ids == self.slot_reqs[: len(req_ids)]:
            return self.cache
        where = {req_id: slot for slot, req_id in enumerate(self.slot_reqs) if req_id}
        dest, src, fresh = [], [], []
        for slot, req_id in enumerate(req_ids):
            old = where.get(req_id)
            if old is None:
                fresh.append(slot)
            elif old != slot:
                dest.append(slot)
                src.append(old)
        self.cache.reserve(len(req_ids), 1)
        self.pending.reserve(len(req_ids), 1)
        if len(self.next_position) < self.cache.slots:
            grown = self.cache.slots - len(self.next_position)
            self.next_position = np.concatenate((self.next_position,
                                                 np.full(grown, -1, np.int64)))
            self.draft_confidence = np.concatenate((self.draft_confidence, np.zeros(
                (grown, self.max_drafts))))
        if dest:
            self.cache.move(dest, src)
            self.pending.move(dest, src)
            self.next_position[dest] = self.next_position[src]
            self.draft_confidence[dest] = self.draft_confidence[src]
        self.next_position[fresh] = -1  # forces a restart of the slot (and drops its rows)
        self.slot_reqs = list(req_ids)
        return self.cache

    def _choose(self, logits: torch.Tensor, kept: list[int], ids: torch.Tensor,
                step: StepRows, drafting: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft-vocabulary ids [n, K] for the n requests with drafts (batch rows
        `drafting`, rows `kept` of logits; ids: their argmax, kept for greedy ones), and
        their q (Proposal.draft_probs) if any of them samples. Only a sampled request's
        logits are copied out (~0.3 ms for 16 requests' in fp32)."""
        if step.sampling is None or self.draft_sampling == "argmax":
            return ids, None
        rows = step.sampling.rows(drafting)
        sampled = (~rows.is_greedy).nonzero().flatten().tolist()
        if not sampled:
            return ids, None
        sampled_rows = rows.rows(sampled)
        q = draft_distribution(logits[[kept[r] for r in sampled]], sampled_rows)
        ids[sampled] = sample_drafts(q, sampled_rows.generators)
        dense = q.dense(self.model.config.vocab_size, self.model.draft_to_target)
        batch_rows = [drafting[r] for r in sampled]
        if batch_rows == list(range(len(step.req_ids))):  # q's rows are the batch's
            return ids, dense
        draft_probs = dense.new_zeros(len(step.req_ids), *dense.shape[1:])
        draft_probs[batch_rows] = dense
        return ids, draft_probs

    def release(self, req_id: str, request=None) -> None:
        """Forget a finished or aborted request; with none left, free the cache, and
        forget what drafting yielded at one request and the probes' backoff there: the
        last request's text goes with it."""
        if req_id in self.slot_reqs:
            self.slot_reqs[self.slot_reqs.index(req_id)] = None
        if self.cache is not None and not any(self.slot_reqs):
            self.clock.request_finished()
            if pause := self.pauses.get(1):
                pause.backoff = 1
            self.cache, self.pending, self.slot_reqs = None, None, []
            self.last_call = None  # the engine idles until the next request: not a step
            self.next_position = np.zeros(0, np.int64)
            self.draft_confidence = self.draft_confidence[:0]
            logger.info("amphista: draft caches empty (all requests released)")

    def cached_positions(self, req_id: str) -> int:
        """Positions of a request held for drafting (0 if none): in the SAL cache, or
        kept for the next pass to run the SAL layers over."""
        if self.cache is None or req_id not in self.slot_reqs:
            return 0
        slot = self.slot_reqs.index(req_id)
        return int(self.cache.lengths[slot] + self.pending.counts[slot])

    def cache_stats(self) -> dict[str, int]:
        return {"sequences": sum(1 for r in self.slot_reqs if r),
                "bytes": self.cache.nbytes() if self.cache is not None else 0}
