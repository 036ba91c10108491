"""How many drafts to verify: per request, per step, from a cost model of this engine.

Verifying a draft costs target time whether or not it is accepted. With c[i, k] the
chance that request i's first k + 1 drafts are all accepted (from the running product
of its heads' top probabilities) a step that verifies m drafts in all is expected to yield
    tokens(m) = B + (the m largest c, summed)          [B = requests in the step]
in time
    time(m)   = step_ms(B, B + m) + draft_ms(B)
and the best m maximises tokens(m) / time(m) (m = 0 included: the draft pass has run
by then, so a draft is verified only if it pays for its own verification). Taking the
largest c first keeps every request's drafts a prefix (c is non-increasing in k).
Whether to run the draft pass at all compares the best such steps over recent requests'
chances, draft pass included, with a plain step, B / step_ms(B, B) (`drafting_gain`). The
chances are the heads' confidence corrected by what the target accepted so far
(`AcceptanceTracker`). `StepCost` is fitted to measured engine steps
(`vllm-amphista calibrate`), so the threshold and the batch size where drafting stops
follow from this machine's numbers, not from constants. The proposer checks that model
against its own steps (`StepClock`): where the drafting steps it timed at a batch size
yielded fewer tokens per unit of time than the plain ones, drafting pauses there, as
the model says or not. While drafting is paused the chances are re-measured by an
occasional probe, after WARM_STEPS steps whose rows are kept for it, so that its first
pass catches the SAL caches up over them first (serving/pending_rows.py); it drafts
until `probe_rows` rows of chances judge again, and is spaced so that warm-up and probe
cost at most PROBE_SHARE of the plain steps' time (`probe_interval`), and less the
longer the pause lasts.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vllm_amphista.machine import CpuInfo, cpu_info, cpu_label, openmp_runtime
from vllm_amphista.paths import CACHE_DIR

STEP_COST_DIR = CACHE_DIR / "step_cost"
# The most of a paused proposer's time spent re-measuring the heads' chances: the price
# of noticing that drafting pays again (another kind of text, better chances). Half of
# what it was while each warm-up step ran the SAL layers: a probe's warm-up now costs
# ~1/3 of that (pending_rows.py), so probes come about as often as then (Intel Xeon with
# AMX, bf16, before backing off: every ~55 plain steps at 16 requests, was ~47; ~28 at
# 4, was ~39).
PROBE_SHARE = 0.01
# Each probe that finds drafting still not paying doubles the spacing of the next, up to
# this factor, so a steady load where drafting never pays spends PROBE_SHARE / 8 on them.
MAX_PROBE_BACKOFF = 8
# Paused steps before a probe whose rows are kept for the probe's SAL layers (no
# drafts): a paused request's cache restarts, and right after a restart the heads'
# first draft is right 34% of the time, after 8 positions 45%, with the whole
# conversation before it 51% (`python -m benchmarks.sal_context`). A probe without them
# would price the heads a third too low and keep drafting paused where it pays.
WARM_STEPS = 8
# Rows of chances a probe gathers before they judge whether drafting pays (`probe_rows`).
# A probe judged by its one step paused drafting at 4 requests on four rows of unsure
# text (AMD EPYC of family 26, bf16, T=0: the model's gain 0.94-1.10 against a timed
# overhead of 1.16-1.17) while drafting steps there paid, and each such probe doubled the
# spacing of the next.
PROBE_ROWS = 16


def compiled_target(vllm_config) -> bool:
    """Whether vLLM compiles the target (its default on a CPU; `enforce_eager` or
    compilation mode 0 keep it eager). A compiled SmolLM2 steps 30-45% faster, so its
    step cost is its own (`step_cost_path`, `shipped_step_cost_path`)."""
    from vllm.config import CompilationMode  # heavy: only where an engine runs

    return vllm_config.compilation_config.mode != CompilationMode.NONE


def step_cost_path(target_dir: str | Path, target_dtype: str, threads: int | None = None,
                   openmp: str | None = None, compiled: bool = False) -> Path:
    """Where `vllm-amphista calibrate` keeps the step cost of this CPU serving this target
    in this dtype with this many compute threads and this OpenMP (default: this
    process's), compiled or eager. Threads are part of the key: on 2 cores one thread
    verifies a token in ~1.5-1.7x the time two do, and an in-process engine computes with
    every core while a served one gets what vLLM binds (on 2 cores both,
    `served_worker_binding`; elsewhere one less). So is the OpenMP: on a family-26 EPYC a
    verified token at one request took 0.17 ms under Intel's against 0.80 ms under GNU's.
    And the CPU's family: a VM's model name ("AMD EPYC") names two generations ~2x apart.
    An eager engine's key is what it was before compiled ones were calibrated."""
    cpu = cpu_info()
    key = [cpu.model, cpu.family, Path(target_dir).name, str(target_dtype).removeprefix("torch."),
           threads or torch.get_num_threads(), openmp or openmp_runtime()]
    digest = hashlib.sha256(json.dumps(key + ["compiled"] * compiled).encode()).hexdigest()
    return STEP_COST_DIR / f"{digest[:16]}.json"


def shipped_step_cost_path(heads_dir: str | Path, target_dtype: str,
                           cpu: CpuInfo | None = None, compiled: bool = False) -> Path:
    """A calibration that travels with the heads (`calibrate --ship`), for the target they
    fit in this dtype on this kind of CPU: what a machine without its own calibration
    starts from. The kind is how the CPU computes bf16 (`CpuInfo.bf16_kind`): natively or
    not sets the draft's dtype (machine.py) and so the draft pass's cost, ~2x apart; AMX
    verified a draft at 4 requests for ~40% of what an AVX-512 BF16 EPYC took (0.58
    against 1.44 ms a token, `vllm-amphista calibrate`, bf16). Within a kind machines
    still differ (a family-26 EPYC: 0.37 ms, the worker on both cores), so the shipped
    file is a start, and `calibrate` measures the machine. A compiled target's file ends
    in "-compiled"."""
    kind = (cpu or cpu_info()).bf16_kind + "-compiled" * compiled
    return Path(heads_dir) / f"step_cost-{str(target_dtype).removeprefix('torch.')}-{kind}.json"


@dataclass(frozen=True)
class StepCost:
    """Measured engine cost at a few batch sizes: per batch size B, a step takes
    fixed_ms + per_token_ms * tokens verified, and the draft pass draft_ms; between and
    beyond the measured sizes every figure is interpolated linearly in B (one line fitted
    per B, because verifying is nearly free at B = 1 and not at B = 16). draft_ms is the
    pass of the heads drafted (`load`'s `heads`): fewer heads, fewer SAL stages to run."""

    batch_sizes: tuple[int, ...]
    fixed_ms: tuple[float, ...]
    per_token_ms: tuple[float, ...]
    draft_ms_at: tuple[float, ...]

    def _at(self, values: tuple[float, ...], requests: int) -> float:
        """In plain Python: the proposer asks every engine step, and numpy's
        interpolation costs ~10x as much for one value."""
        sizes = self.batch_sizes
        if len(sizes) == 1 or requests <= sizes[0]:
            return values[0]
        # Between two measured sizes, or beyond the largest on the last segment's slope.
        upper = min(bisect.bisect_right(sizes, requests), len(sizes) - 1)
        lower = upper - 1
        slope = (values[upper] - values[lower]) / (sizes[upper] - sizes[lower])
        return values[lower] + slope * (requests - sizes[lower])

    def line(self, requests: int) -> tuple[float, float]:
        """A step of `requests`: its fixed ms and its ms per token verified."""
        return self._at(self.fixed_ms, requests), self._at(self.per_token_ms, requests)

    def step_ms(self, requests: int, tokens: int | np.ndarray) -> float | np.ndarray:
        fixed_ms, per_token_ms = self.line(requests)
        return fixed_ms + per_token_ms * tokens

    def draft_ms(self, requests: int) -> float:
        return self._at(self.draft_ms_at, requests)

    @classmethod
    def fit(cls, steps: list[dict], drafts: list[dict]) -> StepCost:
        """steps: {"requests", "tokens", "ms"} per measured engine step configuration;
        drafts: {"requests", "ms"} per measured draft pass, at the same batch sizes."""
        sizes = sorted({s["requests"] for s in steps})
        fixed, per_token = [], []
        for size in sizes:
            rows = [s for s in steps if s["requests"] == size]
            a = np.array([[1.0, s["tokens"]] for s in rows])
            line = np.linalg.lstsq(a, np.array([s["ms"] for s in rows]), rcond=None)[0]
            fixed.append(float(line[0]))
            per_token.append(max(0.0, float(line[1])))  # noise must not make tokens free
        draft = {d["requests"]: d["ms"] for d in drafts}
        return cls(tuple(sizes), tuple(fixed), tuple(per_token),
                   tuple(float(draft[size]) for size in sizes))

    def save(self, path: Path, **context) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"cost": asdict(self), **context}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path, heads: int | None = None) -> StepCost:
        """The calibration in `path`, its draft pass that of the first `heads` heads: the
        whole pass's time times that count's share of it, per batch size, where the file
        has it (`calibrate` times each count; files from before price every count as the
        whole pass). A share, not a time: it is the model's shape, where the whole pass's
        time drifts with the machine's hour."""
        data = json.loads(path.read_text())
        cost = cls(**{k: tuple(v) for k, v in data["cost"].items()})
        shares = data.get("draft_share_by_heads", {}).get(str(heads))
        if shares is None:
            return cost
        return replace(cost, draft_ms_at=tuple(
            ms * share for ms, share in zip(cost.draft_ms_at, shares, strict=True)))

    @staticmethod
    def measured_on(path: Path) -> str:
        """The CPU a calibration file was measured on, with its bf16 flags, threads and
        OpenMP (GNU where not recorded: calibrations before Intel's was preloaded), and
        whether the target was compiled (eager where not recorded: before it was)."""
        data = json.loads(path.read_text())
        machine = data.get("machine", {})
        return (f"{cpu_label(machine)} with {machine.get('torch_threads', '?')} threads, "
                f"{machine.get('openmp', 'gnu')} OpenMP, its target "
                f"{'compiled' if data.get('compiled') else 'eager'}")

    @classmethod
    def linear(cls, fixed_ms: float, per_token_ms: float, draft_ms: float) -> StepCost:
        """One engine at every batch size (tests, examples)."""
        return cls((1,), (fixed_ms,), (per_token_ms,), (draft_ms,))


def confidence(logits: torch.Tensor) -> np.ndarray:
    """logits [B, K, V'] -> [B, K]: running product of each head's top probability.
    Through softmax: on a CPU, in fp32, it is faster than logsumexp and max (AMD EPYC
    with avx512_bf16, one thread, 4 x 4 x 8192 logits: 91 us against 440)."""
    return torch.softmax(logits.float(), -1).amax(-1).cumprod(-1).cpu().numpy()


def _best_step(chances: list[float], requests: int, fixed_ms: float, per_token_ms: float
               ) -> tuple[list[int], int, float, float]:
    """One step's chances (its B requests' K each, flat) -> its drafts by falling chance
    (flat indices), how many of them to verify, and the step's expected tokens and time
    (fixed_ms, draft pass included, + per_token_ms a token verified). In plain Python:
    the proposer asks every drafting step, over a few dozen chances, where numpy's fixed
    cost a call is most of the work."""
    order = sorted(range(len(chances)), key=chances.__getitem__, reverse=True)  # stable
    best, tokens, time = 0, float(requests), fixed_ms + per_token_ms * requests
    best_pace, gained = tokens / time, 0.0
    for verified, index in enumerate(order, 1):
        gained += chances[index]
        step_ms = fixed_ms + per_token_ms * (requests + verified)
        if (requests + gained) / step_ms > best_pace:  # the first best: none unless one pays
            best, tokens, time = verified, requests + gained, step_ms
            best_pace = tokens / time
    return order, best, tokens, time


def _drafting_line(requests: int, cost: StepCost) -> tuple[float, float]:
    """A drafting step of `requests`: its fixed ms, draft pass included, and its ms per
    token verified."""
    fixed_ms, per_token_ms = cost.line(requests)
    return fixed_ms + cost.draft_ms(requests), per_token_ms


def choose_lengths(chance: np.ndarray, cost: StepCost) -> list[int]:
    """chance [B, K] (non-increasing along K) -> drafts to verify per request [B], for a
    step whose draft pass has already run (its time is spent whatever is verified)."""
    requests, k = chance.shape
    order, best, _, _ = _best_step(chance.ravel().tolist(), requests,
                                   *_drafting_line(requests, cost))
    lengths = [0] * requests
    for index in order[:best]:
        lengths[index // k] += 1
    return lengths


def drafting_gain(requests: int, recent: np.ndarray, cost: StepCost) -> float:
    """What running the draft pass at all would yield with this many requests, tokens per
    unit of time over plain steps', given recent drafting requests' chances [n, K] (or one
    typical row [K]): steps of `requests` rows taken from them in turn, each verifying its
    best choice of drafts, draft pass included. Rows, not their mean: a step drafts only
    for its confident requests, which a mean chance would hide."""
    rows = np.atleast_2d(recent).tolist()
    line = _drafting_line(requests, cost)
    tokens = time = 0.0
    for step in range(max(1, len(rows) // requests)):
        chances = [chance for row in range(step * requests, (step + 1) * requests)
                   for chance in rows[row % len(rows)]]
        _, _, step_tokens, step_ms = _best_step(chances, requests, *line)
        tokens, time = tokens + step_tokens, time + step_ms
    return tokens / time / (requests / cost.step_ms(requests, requests))


def heads_that_pay(top1: list[float], cost_of_heads: Callable[[int], StepCost]
                   ) -> tuple[int, list[float]]:
    """How many leading heads to draft: the count whose `drafting_gain`, averaged over the
    calibrated batch sizes, is highest (the fewest on a tie), and each count's gain.
    cost_of_heads(n) is the step cost with the pass of the first n heads. The chances
    are the running product of the heads' held-out top-1 (a chain is accepted as far as
    every head in it is right): for the shipped heads that product gives tau 1.73, their
    measured greedy walk 1.73. Per-step lengths already skip drafts that do not pay, but
    not the pass that computes them: a head reading a later SAL stage adds that stage
    (the calibrations' shares: three heads of four cost as much as four, two ~0.6-0.7 of
    it), whether its draft is verified or not."""
    chain = np.cumprod(top1)
    gains = []
    for heads in range(1, len(top1) + 1):
        cost = cost_of_heads(heads)
        gains.append(float(np.mean([drafting_gain(size, chain[:heads], cost)
                                    for size in cost.batch_sizes])))
    return int(np.argmax(gains)) + 1, gains


class StepClock:
    """How this engine's steps really go, for steps after a draft pass and for plain ones,
    per calibrated batch size: the calibration times the draft pass alone and the engine
    with throw-away drafts, so the proposer's own work around the pass, and whatever else
    runs on the machine while serving, is only seen here. Two readings:
    - `overhead(requests)`: the drafting steps' time over the step cost's prediction,
      against the plain steps', which the proposer holds `drafting_gain` to. A kind not
      yet timed at a size is taken to run as far from the prediction as the other
      (times the overhead of the nearest size where both were timed, 1 where none was):
      an engine that runs under the calibration (an in-process one, a faster hour)
      would otherwise price drafting by its plain steps alone, pause it, and so never
      time the drafting steps that would show it pays. The nearest size's overhead,
      because what the calibration leaves out of a drafting step (the proposer's work
      around the pass, the pass on caches the target's forward has just evicted) is
      there at every size: served on a family-26 EPYC 1.17-1.27 at 1 and 4 requests,
      where a first bet at 16, priced at 1.10 against an overhead of 1, lost
      (docs/decisions.md).
    - `realized_gain(requests)`: what drafting steps have actually yielded, tokens per
      request per unit of time, against plain steps, time counted in units of a plain
      step's prediction at the step's own batch size (so steps of 2 and 3 requests that
      share a calibrated size compare fairly). This is the check of the model's
      prediction: an overpriced chance or an underpriced verification both show here.
      Given the model's expectation, the reading starts from it, worth EXPECTED_STEPS
      drafting steps that fade as real ones are timed: eight drafting steps are few to
      judge a first draft accepted half the time by. At one request the reading is
      that request's text as much as the model, so it goes when the request finishes
      (`request_finished`): the first MT-Bench question's rejected drafts otherwise held
      drafting paused through the next questions, only probes timing drafting steps in a
      pause.
    Per batch size (a step goes to the calibrated size nearest it, on a log scale)
    because the calibration's error differs between them (one request may run 10% under
    its fit while 16 run 20% over): a drafting reading from one request set against a
    plain one from 16 would price neither. Each kind's sums decay by DECAY only when that
    kind is timed at its size, so a long pause keeps what the last drafting steps showed
    (probes refresh it); PRIOR pseudo-steps at the size's pooled ratio keep a few odd
    steps from swinging the overhead, and one step counts at most MAX_RATIO (a stall is
    not the engine's speed). Steps after a call that only kept its rows count as plain,
    that call's own time taken out; a drafting call's catch-up pass over kept rows is
    taken out of its step alike, and its time kept (`catch_up_ms`) to price a probe's
    warm-up.
    Per kind of traffic as well (`sampled`: a step with a sampling request), because the
    calibration verifies greedy drafts only, and a sampled drafting step also builds q
    and rejection-samples over the vocabulary: in-process at 16 requests, bf16, every
    step drafting every head, 18.1 ms of sampling and 2.8 of proposer work a step for 54
    drafts, against 1.1 and 0.5 for 44 greedy ones, on 25-32 ms plain steps. Pooled,
    drafting steps timed at T=0 priced T=0.7 ones. A kind of traffic not yet drafted at
    a size borrows the overhead of the nearest size where the same kind was."""

    DECAY = 0.98
    PRIOR = 4.0
    MAX_RATIO = 3.0
    # What the model expects of drafting counts as this many drafting steps' yields,
    # fading with the drafting steps timed (docs/decisions.md).
    EXPECTED_STEPS = 16.0
    # Steps of each kind timed at a size before their yields are compared there.
    MIN_TIMED = 8.0

    def __init__(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        # Plain Python floats, not numpy: the proposer reads and records every engine
        # step, and right after the target's forward each numpy call on a few values
        # costs microseconds (in-process at 16 requests, bf16, family-26 EPYC: 0.26 ms a
        # paused call with numpy here, 0.12 without; docs/results.md, "The proposer's own
        # work per step").
        self.log_sizes = [math.log(size) for size in batch_sizes]
        self.sizes_of: dict[int, int] = {}  # requests -> `_size`, memoised
        readings = 2 * len(batch_sizes)
        # Per reading (`_reading`), [plain, drafting]: decayed sums of measured /
        # predicted, decayed step counts, tokens emitted per request, and time in units
        # of a plain step's prediction.
        self.observed = [[0.0, 0.0] for _ in range(readings)]
        self.timed = [[0.0, 0.0] for _ in range(readings)]
        self.tokens = [[0.0, 0.0] for _ in range(readings)]
        self.paced = [[0.0, 0.0] for _ in range(readings)]
        # Per reading: the drafting steps in the realized gain's reading, decayed as
        # they are timed (and gone at one request when it finishes).
        self.yielded = [0.0] * readings
        # Per batch size: the proposer's catch-up pass over kept rows (ms, a running
        # mean; 0 until one was timed).
        self.catch_up = [0.0] * len(batch_sizes)

    def _size(self, requests: int) -> int:
        """The calibrated batch size nearest `requests`, on a log scale (the first of
        two as near)."""
        size = self.sizes_of.get(requests)
        if size is None:
            log = math.log(max(requests, 1))
            size = min(range(len(self.log_sizes)), key=lambda i: abs(self.log_sizes[i] - log))
            self.sizes_of[requests] = size
        return size

    def _reading(self, requests: int, sampled: bool) -> int:
        """The readings of that size and kind of traffic (greedy or sampled)."""
        return 2 * self._size(requests) + int(sampled)

    def record(self, requests: int, drafted: bool, measured_ms: float, predicted_ms: float,
               plain_ms: float, tokens: int, sampled: bool = False) -> None:
        """One step of `requests` that took measured_ms against the step cost's
        predicted_ms (plain_ms for a plain step of that size) and emitted `tokens`;
        sampled: a request in it samples."""
        at, kind = self._reading(requests, sampled), int(drafted)
        for sums, value in ((self.observed, min(measured_ms / predicted_ms, self.MAX_RATIO)),
                            (self.timed, 1.0), (self.tokens, tokens / requests),
                            (self.paced, min(measured_ms / plain_ms, self.MAX_RATIO))):
            sums[at][kind] = sums[at][kind] * self.DECAY + value
        if drafted:
            self.yielded[at] = self.DECAY * self.yielded[at] + 1.0

    def request_finished(self) -> None:
        """The only request in flight ended: what drafting yielded at one request was
        its text's, and the next request is other text, so that reading goes and the
        model's expectation decides there again. Not at larger batch sizes: their
        readings average many requests and read the engine more than the text (the ways
        of fading them that were measured: docs/decisions.md). The overhead stays."""
        for at in (self._reading(1, sampled) for sampled in (False, True)):
            self.tokens[at][1] = self.paced[at][1] = self.yielded[at] = 0.0

    def record_catch_up(self, requests: int, ms: float) -> None:
        size = self._size(requests)
        self.catch_up[size] = ms if not self.catch_up[size] else (
            self.DECAY * self.catch_up[size] + (1 - self.DECAY) * ms)

    def catch_up_ms(self, requests: int) -> float | None:
        """A catch-up pass over a warm-up's kept rows at this size (ms); None until timed."""
        return self.catch_up[self._size(requests)] or None

    def _unfaded(self, count: float) -> float:
        """DECAY ** n for a decayed step count (1 - DECAY ** n) / (1 - DECAY): what is
        left of a prior's weight after n steps."""
        return 1.0 - (1.0 - self.DECAY) * count

    def overhead(self, requests: int, sampled: bool = False) -> float:
        at = self._reading(requests, sampled)
        return self._overhead_at(at, self._overhead_nearest(at))

    def _overhead_at(self, at: int, prior_overhead: float) -> float:
        """Drafting's ratio over plain's in a reading, each kind's sums joined by PRIOR
        fading pseudo-steps: plain's at the reading's pooled ratio, drafting's at that
        times `prior_overhead`."""
        observed, timed = self.observed[at], self.timed[at]
        steps = timed[0] + timed[1]
        pooled = (observed[0] + observed[1]) / steps if steps else 1.0
        plain, drafting = (
            (sum_ + self.PRIOR * self._unfaded(count) * pooled * scale)
            / (count + self.PRIOR * self._unfaded(count))
            for sum_, count, scale in zip(observed, timed, (1.0, prior_overhead), strict=True))
        return drafting / plain

    def _overhead_nearest(self, at: int) -> float:
        """The overhead of the same kind of traffic at the calibrated size nearest this
        reading's (log scale) where both kinds of step were timed, 1 where none was: what
        drafting is taken to cost over plain steps there until its own drafting steps
        are timed."""
        here = self.log_sizes[at // 2]
        others = [reading // 2 for reading in range(at % 2, len(self.timed), 2)
                  if reading != at and min(self.timed[reading]) > 0]
        if not others:
            return 1.0
        nearest = min(others, key=lambda size: abs(self.log_sizes[size] - here))
        return self._overhead_at(2 * nearest + at % 2, 1.0)

    def plain_timed(self, requests: int, sampled: bool = False) -> bool:
        """Whether plain steps were timed often enough at this size and kind of traffic
        to be compared."""
        return self.timed[self._reading(requests, sampled)][0] >= self.MIN_TIMED

    def realized_gain(self, requests: int, expected: float | None = None,
                      sampled: bool = False) -> float | None:
        """Drafting steps' tokens per unit of time over plain steps' at this size and kind
        of traffic; None until both kinds of step were timed MIN_TIMED times there, or
        while no drafting step's yield is left (at one request, after it finished).
        `expected`: the model's gain, which the reading starts from (EXPECTED_STEPS,
        fading as drafting steps are timed, as the overhead's prior does; whole again at
        one request when it ends)."""
        at = self._reading(requests, sampled)
        yielded = self.yielded[at]
        if min(self.timed[at]) < self.MIN_TIMED or not yielded:
            return None
        (plain_tokens, drafting_tokens), (plain_time, drafting_time) = (self.tokens[at],
                                                                        self.paced[at])
        measured = drafting_tokens / drafting_time / (plain_tokens / plain_time)
        if expected is None:
            return measured
        weight = self.EXPECTED_STEPS * self._unfaded(yielded)
        return (yielded * measured + weight * expected) / (yielded + weight)


class AcceptanceTracker:
    """How often the target accepted the drafts it verified, per draft position and per
    band of the heads' confidence in them: the factor that turns confidence into the
    chance the cost model needs. Per band because the heads are off by different amounts
    at different confidences (on MT-Bench at position 1: right at 0.3, 10% too sure above
    0.7), and which drafts get verified depends on the load: at one request nearly all, at
    16 only the most confident. One factor for all would be learnt on the first and
    applied to the second. A band's factor starts from its position's (PRIOR pseudo-drafts
    of confidence mass at that factor) and the position's from 1, so a sparse band
    borrows from the rest of its position's evidence. Greedy and sampled requests keep
    separate factors: a greedy request accepts a draft that is the target's argmax, a
    sampled one with the target's probability of it (min(1, p/q) where drafts are sampled
    from q), so the same confidence is worth less there, and mixed traffic would otherwise
    price each kind by the other's. Sums decay by DECAY per recorded step so the factors
    follow the traffic."""

    DECAY = 0.998
    # The heads' own confidence counts as this many drafts' worth of evidence. With 2,
    # the first MT-Bench question's first four drafts, all rejected, halved every chance
    # at one request, and drafting stayed paused for a whole in-process run (bf16, Intel
    # Xeon with AMX: 0.99x vanilla; with 16, 1.22x); at 8 as well.
    PRIOR = 16.0
    BANDS = 10  # equal widths of confidence in [0, 1]

    def __init__(self, k: int) -> None:
        # Per kind (0 greedy, 1 sampled), position and band: decayed sums of the verified
        # drafts' confidence, and decayed counts of the accepted ones.
        self.expected = np.zeros((2, k, self.BANDS))
        self.accepted = np.zeros((2, k, self.BANDS))

    def _band(self, confidence: float) -> int:
        return min(int(confidence * self.BANDS), self.BANDS - 1)

    def record(self, confidence: np.ndarray, verified: Sequence[int], accepted: Sequence[int],
               sampled: np.ndarray | None = None) -> None:
        """confidence [n, K] of n requests' drafts, of which verified [n] were verified
        (0: a request without drafts this step) and accepted [n] accepted; sampled [n]:
        which requests sample (None: none). A loop over the verified drafts, a few a
        request: every drafting step records, and numpy's scatter costs more than the
        additions (as StepClock's)."""
        self.expected *= self.DECAY
        self.accepted *= self.DECAY
        kinds = [False] * len(verified) if sampled is None else sampled.tolist()
        for row, count, taken, kind in zip(confidence.tolist(), verified, accepted, kinds,
                                           strict=True):
            for position, value in enumerate(row[:count]):
                at = int(kind), position, self._band(value)
                self.expected[at] += value
                self.accepted[at] += position < taken

    def chance(self, confidence: np.ndarray, sampled: np.ndarray | None = None) -> np.ndarray:
        """[B, K] confidence (sampled [B]: which requests sample) -> chance of
        acceptance, still non-increasing along K: confidence times its kind's, position's
        and band's accepted over expected, drawn to the position's own factor where the
        band has little evidence (PRIOR)."""
        accepted, expected = self.accepted.tolist(), self.expected.tolist()
        position_factor = [[(sum(a) + self.PRIOR) / (sum(e) + self.PRIOR)
                            for a, e in zip(accepted[kind], expected[kind], strict=True)]
                           for kind in (0, 1)]
        kinds = [False] * len(confidence) if sampled is None else sampled.tolist()
        chances = []
        for row, kind in zip(confidence.tolist(), kinds, strict=True):
            running = 1.0
            for position, value in enumerate(row):
                band = self._band(value)
                factor = ((accepted[kind][position][band]
                           + self.PRIOR * position_factor[kind][position])
                          / (expected[kind][position][band] + self.PRIOR))
                running = min(running, max(value * factor, 0.0))
                chances.append(running)
        return np.array(chances).reshape(confidence.shape)


def probe_rows(requests: int) -> int:
    """Rows of chances that judge drafting after a probe at this many requests:
    PROBE_ROWS, but one at one request. There a probe's rows are one text's next
    positions, drafting pays by ~20-25% on the shipped heads, so a pause is a stretch of
    hard text, and a probe step costs ~10% of a plain step: one-step probes every ~18
    steps kept 2299-2431 of ~2480 steps drafting in three benches (1.21-1.25x, bf16,
    T=0), sixteen-step ones, ~16 times as far apart, 1645-1994 (1.07-1.19x)."""
    return PROBE_ROWS if requests > 1 else 1


def probe_steps(requests: int) -> int:
    """Drafting steps of one probe at this many requests."""
    return -(-probe_rows(requests) // requests)


def probe_interval(requests: int, cost: StepCost, warm_ms: float = 0.0) -> int:
    """Plain steps per probe while paused: one probe per this many steps costs at most
    PROBE_SHARE of their time. A probe costs the catch-up over its warm-up's rows
    (warm_ms) and, for each of its `probe_steps`, a draft pass and the verification of
    about a draft a request (`_plan` cuts its drafts to what pays, and where drafting is
    paused that is about the first ones: unpriced, probes at 16 requests took ~1.5% of a
    bench's time, not 1%)."""
    plain_ms = float(cost.step_ms(requests, requests))
    probe_ms = warm_ms + probe_steps(requests) * (
        cost.draft_ms(requests) + float(cost.step_ms(requests, 2 * requests)) - plain_ms)
    return max(1, math.ceil(probe_ms / (PROBE_SHARE * plain_ms)))
