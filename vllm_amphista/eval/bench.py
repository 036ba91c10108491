"""`vllm-amphista bench`: vanilla vs Amphista vs Medusa in the same vLLM, same run.

Every method is a `vllm serve` of the same target with the same engine flags; only the
speculative settings differ:
  vanilla      no speculation
  amphista     our proposer with the Amphista heads
  medusa       our proposer with the Medusa-mode heads (same pipeline, same data)
  vllm-medusa  vLLM 0.32's built-in Medusa with those heads exported to its format
  vanilla-sync vanilla with --no-async-scheduling, as vLLM 0.32 runs every custom_class
               proposer (ours). On a CPU its platform turns async scheduling off for
               every engine, so there this is a second vanilla: the spread of the bench
               between two identical engines

All servers are started first (warmed up, then left idle); the measured runs are then
interleaved (repeat -> temperature -> concurrency -> method), so a drift in the
machine's speed hits every method alike, the methods' order reversed every other
repeat, so no method always runs first, each run starting ENGINE_SETTLE_S after the
last one ended, so it does not share the CPU with the last engine's polling. Each run
sends the whole prompt file with `concurrency` requests in flight, identical sampling
parameters and max_tokens for every method. At temperature > 0 every request generates
exactly max_tokens (`ignore_eos`): each run samples other answers, and their lengths
would otherwise differ from method to method and run to run (a batch's last long answer
sets its wall time). Tokens/s is completion tokens over the run's wall time; latency is
per request, end to end; tau and per-position acceptance come from the server's
spec-decode counters read before and after the run. At temperature 0 every method's
tokens are compared with vanilla's at concurrency 1, each prompt alone (run once more,
unmeasured, where the bench has no concurrency 1), vanilla's own included: in bf16 those
are the flips a method is held to.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from vllm_amphista.convert.medusa import export_vllm_medusa
from vllm_amphista.engine import (
    EAGER_ENV,
    ENGINE_SETTLE_S,
    PROCESS_START_SETTINGS,
    eager_engines,
    set_engine_environment,
)
from vllm_amphista.eval.report import machine_line, write_report
from vllm_amphista.eval.server import get_text, post_json, vllm_server, worker_cores
from vllm_amphista.eval.tau import acceptance_per_position, tau
from vllm_amphista.machine import DTYPE_NAMES, TARGET_DTYPE, describe, openmp_in, resolve_dtype
from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.paths import CACHE_DIR, SHIPPED_HEADS
from vllm_amphista.prompts import first_turns
from vllm_amphista.serving.patches import engine_version

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("vanilla", "amphista", "medusa", "vllm-medusa", "vanilla-sync")
# Methods that run vLLM without speculation: their bf16 flips are vanilla's own.
PLAIN_METHODS = ("vanilla", "vanilla-sync")
FLIP_CHECK_CONCURRENCY = 4  # see flip_check_concurrency
# bf16 greedy_verdict: the chance of failing a bench whose methods flip at vanilla's rate.
FLIP_ALPHA = 0.05


@dataclass
class Run:
    """One pass of the prompt file through one server."""

    tokens_per_s: float
    latencies: list[float]
    outputs: list[list[int]]
    drafts: int
    accepted_per_position: list[int]


# -- the methods ----------------------------------------------------------------------------
def exported_medusa(medusa_heads: Path, target: Path) -> Path:
    """vLLM-format copy of the Medusa-mode heads, cached by the heads' content."""
    digest = hashlib.sha256((medusa_heads / "model.safetensors").read_bytes()).hexdigest()[:16]
    out = CACHE_DIR / "vllm-medusa" / digest
    if not (out / "config.json").is_file():
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        export_vllm_medusa(medusa_heads, staging, TargetWeights.from_folder(target))
        staging.rename(out)
    return out


def flip_check_concurrency(args: argparse.Namespace) -> int | None:
    """A bf16 bench of greedy requests one at a time has no vanilla run of another batch
    shape to count vanilla's own near-tie flips from (greedy_verdict): vanilla runs once
    more at this concurrency, unmeasured, and the servers must take that many."""
    if ("vanilla" in args.methods and 0.0 in args.temperature and args.dtype != "float32"
            and max(args.concurrency) == 1):
        return FLIP_CHECK_CONCURRENCY
    return None


def server_args(method: str, args: argparse.Namespace) -> list[str]:
    batch = max(*args.concurrency, flip_check_concurrency(args) or 1)
    common = [str(args.target), "--dtype", args.dtype, "--seed", "0",
              "--max-model-len", "2048", "--max-num-seqs", str(batch),
              *(["--enforce-eager"] if eager_engines() else [])]
    ours = {"method": "amphista", "step_cost": args.step_cost, "draft_dtype": args.draft_dtype}
    if args.k:
        ours["num_speculative_tokens"] = args.k
    if args.disable_by_batch_size:  # our proposer only: vLLM 0.32's Medusa has no such knob
        ours["disable_by_batch_size"] = args.disable_by_batch_size
    if method == "vanilla":
        return common
    if method == "vanilla-sync":
        return [*common, "--no-async-scheduling"]
    if method in ("amphista", "medusa"):
        heads = args.amphista_heads if method == "amphista" else args.medusa_heads
        return [*common, "--speculative-config", json.dumps({**ours, "model": str(heads)})]
    if method == "vllm-medusa":
        spec = {"method": "medusa", "model": str(exported_medusa(args.medusa_heads, args.target)),
                "num_speculative_tokens": args.k or AmphistaConfig.load(args.medusa_heads)
                .num_heads}
        return [*common, "--speculative-config", json.dumps(spec)]
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def methods_in_turn(methods: list[str], repeat: int) -> list[str]:
    """The order the methods run in a repeat: reversed every other one, so that whatever
    running first (or right after another method) does to a run, no method always gets
    it."""
    return list(methods) if repeat % 2 == 0 else list(reversed(methods))


# -- one measured run -----------------------------------------------------------------------
_COUNTER = re.compile(r'^(vllm:spec_decode_\w+?)_total(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$')


def spec_counters(metrics_text: str) -> tuple[int, list[int]]:
    """(drafts, accepted tokens per draft position) from a Prometheus /metrics page."""
    drafts, per_position = 0, {}
    for line in metrics_text.splitlines():
        match = _COUNTER.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        if name == "vllm:spec_decode_num_drafts":
            drafts += int(float(value))
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            position = int(re.search(r'position="(\d+)"', labels).group(1))
            per_position[position] = per_position.get(position, 0) + int(float(value))
    return drafts, [per_position[p] for p in sorted(per_position)]


WARM_UP_TOKENS = 4  # steps, about, between two warm-up requests' ends


def measure(base: str, prompts: list[str], concurrency: int, temperature: float,
            max_tokens: int, top_p: float = 1.0) -> Run:
    """Every prompt at `concurrency` at once; sampled requests (temperature > 0) with
    `top_p`."""
    def one(prompt: str) -> tuple[float, list[int]]:
        started = time.perf_counter()
        reply = post_json(f"{base}/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "ignore_eos": temperature > 0,
            "top_p": top_p if temperature > 0 else 1.0,
            "return_token_ids": True}, timeout=1800)
        return time.perf_counter() - started, reply["choices"][0]["token_ids"]

    drafts_before, accepted_before = spec_counters(get_text(f"{base}/metrics"))
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - started
    drafts_after, accepted_after = spec_counters(get_text(f"{base}/metrics"))
    accepted_before += [0] * (len(accepted_after) - len(accepted_before))
    accepted = [a - b for a, b in zip(accepted_after, accepted_before, strict=True)]
    return Run(tokens_per_s=sum(len(t) for _, t in results) / wall,
               latencies=[s for s, _ in results], outputs=[t for _, t in results],
               drafts=drafts_after - drafts_before, accepted_per_position=accepted)


def warm_up(base: str, prompts: list[str], concurrencies: list[int]) -> None:
    """Every batch size up to each concurrency to be measured, not measured: a server's
    first steps at a batch size pay one-off costs (allocations, oneDNN primitives for the
    new shapes). Warmed up at two requests only, both servers' first 16-request run read
    3-8% under their next ones (family-26 EPYC, bf16, one server at a time), and that run
    was the bench's T=0 cell. The i-th of a concurrency's requests asks for
    WARM_UP_TOKENS * (i + 1) tokens, EOS ignored, so the batch then shrinks one request at
    a time down to one: a measured run's tail meets those sizes too. (Our proposer warms
    the token counts its drafting steps add when it loads: serving/warm_up.py.)"""
    def one(index: int) -> None:
        post_json(f"{base}/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompts[index % len(prompts)]}],
            "max_tokens": WARM_UP_TOKENS * (index + 1), "temperature": 0.0,
            "ignore_eos": True}, timeout=1800)

    for concurrency in concurrencies:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(concurrency)))


def start_servers(servers: ExitStack, args: argparse.Namespace, prompts: list[str],
                  log_dir: Path, extra_env: dict[str, str | None] | None = None,
                  ) -> tuple[dict[str, str], dict]:
    """A `vllm serve` per method in args.methods (stopped as `servers` closes), under the
    served engine environment changed by extra_env (None unsets), each warmed up at every
    concurrency in args.concurrency: their base URLs by method, and the machine as the
    servers compute on it (the threads their workers bound, the OpenMP they preload), not
    as this process does."""
    set_engine_environment(in_process=False)
    env = {k: v for k, v in {**os.environ, **(extra_env or {})}.items()
           if k != "TRITON_INTERPRET" and v is not None}
    bases, threads = {}, None
    for method in args.methods:
        print(f"starting {method} ...", flush=True)
        bases[method], log = servers.enter_context(vllm_server(
            server_args(method, args), env, timeout=600, log_dir=log_dir))
        threads = worker_cores(log.read_text()) or threads
        warm_up(bases[method], prompts, args.concurrency)
    return bases, {**describe(), "torch_threads": threads,
                   "openmp": openmp_in(env.get("LD_PRELOAD", ""))}


# -- summary ----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def first_difference(output: list[int], reference: list[int]) -> int | None:
    """The index of the first token where two greedy answers part (one ending before the
    other counts as parting there); None if they are the same."""
    if output == reference:
        return None
    pairs = zip(output, reference, strict=False)  # the shorter one's end is a difference
    return next((i for i, (a, b) in enumerate(pairs) if a != b),
                min(len(output), len(reference)))


def flip_record(reps: list[Run], reference: list[list[int]]) -> dict:
    """How a method's greedy answers part from the reference, run by run: the prompts
    that differ in any run, per run how many, and over all runs the flip rate: flips per
    1000 tokens that matched the reference before them (a prompt's tokens up to its first
    difference, or all of them). The union of differing prompts grows with every repeat
    for a method whose batch shapes change from run to run (speculation verifies a
    different number of tokens each step) and not for one whose shapes repeat (vanilla
    at a fixed concurrency); the rate does not depend on the number of repeats."""
    parted = [[first_difference(out, reference[i]) for i, out in enumerate(run.outputs)]
              for run in reps]
    flips = sum(at is not None for run in parted for at in run)
    matched = sum(len(reference[i]) if at is None else at
                  for run in parted for i, at in enumerate(run))
    return {"mismatched_prompts": sorted({i for run in parted
                                          for i, at in enumerate(run) if at is not None}),
            "mismatched_per_run": [sum(at is not None for at in run) for run in parted],
            "first_differences": sorted(at for run in parted for at in run if at is not None),
            "flips": flips, "matched_tokens": matched,
            "flips_per_1k_tokens": 1e3 * flips / max(matched, 1)}


def summarise(runs: dict[tuple[str, float, int], list[Run]],
              alone: list[list[int]] | None = None) -> list[dict]:
    """One row per (method, temperature, concurrency); speedup against vanilla's row at
    the same temperature and concurrency; greedy tokens against `alone` (vanilla's
    greedy outputs with each prompt alone), else vanilla's first greedy run at its
    lowest concurrency."""
    greedy_vanilla = sorted(c for m, t, c in runs if m == "vanilla" and t == 0.0)
    reference = alone
    if reference is None and greedy_vanilla:
        reference = runs[("vanilla", 0.0, greedy_vanilla[0])][0].outputs
    rows = []
    for (method, temperature, concurrency), reps in runs.items():
        speeds = [r.tokens_per_s for r in reps]
        vanilla = runs.get(("vanilla", temperature, concurrency))
        drafts = sum(r.drafts for r in reps)
        accepted = [sum(col) for col in zip(*(r.accepted_per_position for r in reps),
                                             strict=True)]
        latencies = [x for r in reps for x in r.latencies]
        row = {
            "method": method, "temperature": temperature, "concurrency": concurrency,
            "repeats": len(reps), "tokens_per_s": statistics.mean(speeds),
            "tokens_per_s_runs": speeds,
            "tokens_per_s_stdev": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
            "latency_p50_s": percentile(latencies, 0.5),
            "latency_p90_s": percentile(latencies, 0.9),
            "speedup": (statistics.mean(speeds) / statistics.mean(
                r.tokens_per_s for r in vanilla)) if vanilla else None,
            # Repeat by repeat: a method's run against vanilla's of the same repeat, run
            # next to it in time, so their spread is what one repeat can resolve.
            "speedup_runs": [mine / theirs.tokens_per_s for mine, theirs
                             in zip(speeds, vanilla or [], strict=False)]
            if method != "vanilla" else [],
            "drafts": drafts,
            "tau": tau(sum(accepted), drafts) if drafts else None,
            "acceptance_per_position": acceptance_per_position(accepted, drafts) if drafts else [],
        }
        if temperature == 0.0 and reference is not None:
            row.update(flip_record(reps, reference))
            row["identical_to_vanilla"] = not row["mismatched_prompts"]
        rows.append(row)
    return rows


def excess_flips_p(flips: int, matched: int, ref_flips: int, ref_matched: int) -> float:
    """One-sided p-value of `flips` in `matched` tokens against a reference's rate: how
    likely a share this large of the two cells' flips falls to the first if both flip at
    one rate (given the total, the first's count is binomial with its share of the tokens)."""
    if ref_matched == 0:  # the reference flipped every answer at its first token
        return 1.0
    if matched == 0:
        return 0.0 if flips else 1.0
    total, share = flips + ref_flips, matched / (matched + ref_matched)
    return min(1.0, sum(math.exp(math.lgamma(total + 1) - math.lgamma(k + 1)
                                 - math.lgamma(total - k + 1) + k * math.log(share)
                                 + (total - k) * math.log1p(-share))
                        for k in range(flips, total + 1)))


def greedy_verdict(rows: list[dict], dtype: str,
                   vanilla_apart: dict | None = None) -> tuple[bool, str]:
    """Whether the greedy outputs are vanilla's, and the line that says so. In float32
    every token must match vanilla alone (concurrency 1). In bf16 vanilla itself flips
    near-ties with the batch's shape, so each cell of a method is held to the flip rate
    (flips per 1000 tokens matched before them, flip_record) of vanilla's most flipping
    cell at another concurrency (its rows, or `vanilla_apart`, a flip_record counted
    apart): it fails where its rate is higher than chance explains, a one-sided test at
    FLIP_ALPHA shared among the method cells tested. A rate, not a count of prompts: in
    128 tokens 13-15 of 16 prompts flip somewhere for vanilla and a method alike, so the
    count sits at its ceiling and one prompt over vanilla's failed a run whose rate was
    vanilla's (docs/decisions.md, "bf16 greedy outputs are held to vanilla's own flip
    rate"). `vanilla-sync` is vanilla too (PLAIN_METHODS)."""
    greedy = [r for r in rows if "mismatched_per_run" in r]
    cells = [r for r in greedy if r["method"] not in PLAIN_METHODS]
    if dtype == "float32" or not any(r["mismatched_prompts"] for r in cells):
        worst = max((max(r["mismatched_per_run"]) for r in cells), default=0)
        if not worst:
            return True, "temperature 0: every method produced vanilla's tokens"
        return False, (f"temperature 0, {dtype}: SOME OUTPUTS DIFFER FROM VANILLA on up to "
                       f"{worst} prompts in a run (see mismatched_per_run)")
    own = [r for r in greedy if r["method"] in PLAIN_METHODS and r["concurrency"] > 1]
    own += [{"concurrency": FLIP_CHECK_CONCURRENCY, **vanilla_apart}] if vanilla_apart else []
    if not own:
        return False, (f"temperature 0, {dtype}: SOME OUTPUTS DIFFER FROM VANILLA and the "
                       "bench ran no vanilla at another concurrency to hold them to")
    ref = max(own, key=lambda r: r["flips_per_1k_tokens"])
    level = FLIP_ALPHA / len(cells)
    tested = [(excess_flips_p(r["flips"], r["matched_tokens"], ref["flips"],
                              ref["matched_tokens"]), r) for r in cells]
    p, closest = min(tested, key=lambda t: t[0])
    said = (f"{closest['method']} at {closest['concurrency']} requests "
            f"{closest['flips_per_1k_tokens']:.1f} flips per 1000 tokens against vanilla's own "
            f"{ref['flips_per_1k_tokens']:.1f} at {ref['concurrency']} requests (p = {p:.3g}, "
            f"held to {level:.3g})")
    if p >= level:
        return True, (f"temperature 0, {dtype}: greedy outputs flip no more often than "
                      f"vanilla's own at another concurrency; the closest: {said}")
    return False, (f"temperature 0, {dtype}: SOME OUTPUTS DIFFER FROM VANILLA more often "
                   f"than vanilla's own batch flips: {said}")


def markdown(rows: list[dict]) -> str:
    lines = ["| method | temp | conc | tokens/s (± sd) | speedup (runs) | p50 / p90 latency s "
             "| tau | acceptance per position | same tokens as vanilla |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["temperature"], r["concurrency"],
                                         METHODS.index(r["method"]))):
        lines.append(
            f"| {r['method']} | {r['temperature']:g} | {r['concurrency']} | "
            f"{r['tokens_per_s']:.1f} ± {r['tokens_per_s_stdev']:.1f} | "
            f"{speedup_cell(r)} | "
            f"{r['latency_p50_s']:.2f} / {r['latency_p90_s']:.2f} | "
            f"{'-' if r['tau'] is None else format(r['tau'], '.2f')} | "
            f"{' '.join(f'{a:.2f}' for a in r['acceptance_per_position']) or '-'} | "
            f"{greedy_cell(r)} |")
    return "\n".join(lines)


def speedup_cell(row: dict) -> str:
    """"1.02x (0.97-1.06)": the speedup, and the lowest and highest of its repeats'."""
    if row["speedup"] is None:
        return "-"
    runs = row.get("speedup_runs", [])
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    return f"{row['speedup']:.2f}x{spread}"


def greedy_cell(row: dict) -> str:
    """The table's verdict on a row's greedy tokens against vanilla's (- if sampled)."""
    if "identical_to_vanilla" not in row:
        return "-"
    if row["identical_to_vanilla"]:
        return "yes"
    return (f"NO ({len(row['mismatched_prompts'])} prompts; per run "
            f"{', '.join(map(str, row['mismatched_per_run']))}; "
            f"{row['flips_per_1k_tokens']:.1f} flips / 1k tokens)")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4),
                             squeeze=False)
    for ax, temperature in zip(axes[0], temperatures, strict=True):
        for method in METHODS:
            mine = sorted((r for r in rows if r["method"] == method
                           and r["temperature"] == temperature), key=lambda r: r["concurrency"])
            if mine:
                ax.errorbar([r["concurrency"] for r in mine], [r["tokens_per_s"] for r in mine],
                            yerr=[r["tokens_per_s_stdev"] for r in mine], marker="o",
                            capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"temperature {temperature:g}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Environment variables that set how vLLM's CPU engine computes (threads, OpenMP runtime).
ENGINE_SETTINGS = ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "VLLM_USE_AOT_COMPILE",
                   EAGER_ENV, *PROCESS_START_SETTINGS)


def environment() -> dict:
    """Versions, the commit, and the engine settings the servers start under."""
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "vllm": engine_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "git_commit": commit or None,
            "engine": {key: os.environ[key] for key in ENGINE_SETTINGS if key in os.environ}}


# -- the command ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=Path,
                        help="target model folder (default: SmolLM2-135M-Instruct, exported "
                        "to the cache if missing)")
    parser.add_argument("--amphista-heads", type=Path, default=SHIPPED_HEADS / "amphista")
    parser.add_argument("--medusa-heads", type=Path, default=SHIPPED_HEADS / "medusa")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=[m for m in METHODS if m != "vanilla-sync"],  # a diagnostic
                        help="default: all but vanilla-sync")
    parser.add_argument("--prompts", help="FastChat question.jsonl (default: MT-Bench)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="top-p of the sampled requests (1: none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--k", type=int, default=0, help="drafts per step (0: the heads "
                        "that pay here, at most the heads' K)")
    parser.add_argument("--disable-by-batch-size", type=int, default=0,
                        help="our proposer skips drafting in steps with more decoding "
                        "requests than this (0: the step cost decides)")
    parser.add_argument("--step-cost", default="auto",
                        help="our proposer's draft lengths: auto (the `vllm-amphista "
                        "calibrate` file of this machine, if any), off (all K), or a file")
    parser.add_argument("--dtype", default=TARGET_DTYPE, choices=list(DTYPE_NAMES),
                        help="the target's dtype, the same for every method (bf16 flips "
                        "near-ties with the batch's shape, so equality with vanilla is "
                        "only exact in float32)")
    parser.add_argument("--draft-dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="our draft model's dtype (auto: the machine's, machine.py)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))


def main(args: argparse.Namespace) -> int:
    if args.target is None:
        args.target = export_smollm2()
    if args.repeats < 1 or min(args.concurrency) < 1 or args.num_prompts < 1:
        raise SystemExit("error: --repeats, --concurrency and --num-prompts must be >= 1")
    prompts = first_turns(args.prompts, limit=args.num_prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, float, int], list[Run]] = {}
    started = time.perf_counter()
    with ExitStack() as servers:
        bases, served = start_servers(servers, args, prompts, log_dir=args.out)
        alone = batched = None
        if "vanilla" in bases and 0.0 in args.temperature and 1 not in args.concurrency:
            # Greedy outputs' reference (summarise): vanilla with each prompt alone.
            alone = measure(bases["vanilla"], prompts, 1, 0.0, args.max_tokens).outputs
        if flip_check := flip_check_concurrency(args):
            batched = measure(bases["vanilla"], prompts, flip_check, 0.0, args.max_tokens)
        for repeat in range(args.repeats):
            for temperature in args.temperature:
                for concurrency in args.concurrency:
                    for method in methods_in_turn(args.methods, repeat):
                        time.sleep(ENGINE_SETTLE_S)  # the last run's engine core spins on
                        run = measure(bases[method], prompts, concurrency, temperature,
                                      args.max_tokens, args.top_p)
                        runs.setdefault((method, temperature, concurrency), []).append(run)
                        print(f"{method:>12} T={temperature:g} c={concurrency:<3} "
                              f"{run.tokens_per_s:7.1f} tok/s", flush=True)
    rows = summarise(runs, alone)
    report = {"target": str(args.target), "prompts": args.prompts or "MT-Bench",
              "num_prompts": len(prompts), "max_tokens": args.max_tokens,
              "sampled_top_p": args.top_p,
              "repeats": args.repeats, "methods": args.methods, "k": args.k or None,
              "disable_by_batch_size": args.disable_by_batch_size or None,
              "heads": {"amphista": str(args.amphista_heads), "medusa": str(args.medusa_heads)},
              "environment": environment(), "target_dtype": args.dtype,
              "draft_dtype": str(resolve_dtype(args.draft_dtype)).removeprefix("torch."),
              "wall_s": time.perf_counter() - started,
              "rows": rows}
    write_report(args.out / "bench.json", report, served)
    table = machine_line(served, target=args.dtype, draft=report["draft_dtype"], **(
        {"sampled top-p": args.top_p} if args.top_p < 1 else {})) + "\n\n" + markdown(rows)
    (args.out / "bench.md").write_text(table + "\n")
    plot(rows, args.out / "bench.png")
    print(table)
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    vanilla_apart = None if batched is None else flip_record(
        [batched], runs[("vanilla", 0.0, 1)][0].outputs)
    lossless, verdict = greedy_verdict(rows, args.dtype, vanilla_apart)
    print(verdict)
    return 0 if lossless else 1
