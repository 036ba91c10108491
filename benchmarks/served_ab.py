"""Vanilla and Amphista served side by side at one concurrency, many alternating runs:
tokens/s, and the CPU seconds each server's processes spent, the measured server's and the
idle one's, and the second's tokens/s over the first's round by round (their mean and
standard error).

    python -m benchmarks.served_ab [--concurrency 16] [--before 4] [--temperature 0]
        [--rounds 4] [--pairs 1] [--dtype bfloat16] [--env-b NAME[=VALUE] ...]
        [--out results/served_ab.json]

Both servers stay up, as in `vllm-amphista bench` (same server flags, same prompts, the
same warm-up), and take turns, reversed every other round. `--before N` runs N requests at
once, unmeasured, right before each measured run, as the bench runs its 4-request cell
right before its 16-request one: what the proposer learnt there carries over. A bench
cell is two runs; this puts many behind one comparison, and the CPU seconds say which
process (API server, engine core, worker) any difference comes from. `--env-b` changes
the second server's environment: with one method twice (`--methods vanilla vanilla`),
what an engine setting does to one engine. `--pairs P` starts a fresh pair of servers P
times, the first started alternating, each for `--rounds` rounds: one pair's two engine
processes can differ by ~10% in the target's forward alone (family-25 EPYC, bf16, 16
requests: 28.4 against 25.3 ms a step, docs/results.md), luck of the process that rounds
within a pair share, so with several pairs the standard error is taken over the pairs'
means.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

from vllm_amphista.engine import ENGINE_SETTLE_S
from vllm_amphista.eval import bench
from vllm_amphista.eval.report import machine_line, markdown_table, write_report
from vllm_amphista.model.target import export_smollm2
from vllm_amphista.prompts import first_turns


def cpu_seconds(server: psutil.Process) -> dict[str, float]:
    """User + system CPU seconds so far of a `vllm serve` process and its children, by
    process name (vllm, VLLM::EngineCore, VLLM::Worker, ...)."""
    seconds: dict[str, float] = {}
    for process in [server, *server.children(recursive=True)]:
        try:
            times = process.cpu_times()
            name = process.name()
        except psutil.Error:  # gone between listing and reading
            continue
        seconds[name] = seconds.get(name, 0.0) + times.user + times.system
    return seconds


def spent(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before.get(name, 0.0), 3) for name in after}


def server_process(port: str) -> psutil.Process:
    """The `vllm serve` process listening on this port (started by `vllm_server`)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "serve" in cmdline and port in cmdline:
            return process
    raise RuntimeError(f"no vllm serve process for port {port}")


def run_pair(pair: int, sides: dict[str, tuple[str, dict]], args: argparse.Namespace,
             bench_args: argparse.Namespace, prompts: list[str]) -> tuple[list[dict], dict]:
    """Start a pair of servers (the first of `sides` first in even pairs) and measure
    them for args.rounds rounds; their runs, and the machine as the servers see it."""
    runs: list[dict] = []
    with ExitStack() as servers:
        bases = {}
        for side in bench.methods_in_turn(list(sides), pair):
            bench_args.methods = [sides[side][0]]
            started, served = bench.start_servers(servers, bench_args, prompts,
                                                  log_dir=Path("/tmp"),
                                                  extra_env=sides[side][1])
            bases[side] = started[sides[side][0]]
        processes = {side: server_process(base.rsplit(":", 1)[1])
                     for side, base in bases.items()}
        for round_ in range(args.rounds):
            for side in bench.methods_in_turn(list(sides), round_):
                idle = processes[next(other for other in sides if other != side)]
                if args.before:
                    time.sleep(ENGINE_SETTLE_S)
                    bench.measure(bases[side], prompts, args.before, args.temperature,
                                  bench_args.max_tokens)
                time.sleep(ENGINE_SETTLE_S)
                before = cpu_seconds(processes[side]), cpu_seconds(idle)
                run = bench.measure(bases[side], prompts, args.concurrency,
                                    args.temperature, bench_args.max_tokens)
                runs.append({"method": side, "pair": pair, "round": round_,
                             "tokens_per_s": run.tokens_per_s, "drafts": run.drafts,
                             "tokens": sum(map(len, run.outputs)),
                             "cpu_s": spent(cpu_seconds(processes[side]), before[0]),
                             "idle_server_cpu_s": spent(cpu_seconds(idle), before[1])})
                print(f"{side:>9} pair {pair} round {round_}: {run.tokens_per_s:6.1f} "
                      f"tokens/s, {run.drafts} drafts", flush=True)
    return runs, served


def round_ratios(runs: list[dict], sides: list[str]) -> list[float]:
    """The second side's tokens/s over the first's, round by round (pairs in turn): the
    two runs of a round ran next to each other in time."""
    first, second = ([r for r in runs if r["method"] == side] for side in sides)
    return [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(first, second, strict=True)]


def ratio_summary(runs: list[dict], sides: list[str]) -> str:
    """The ratios round by round, their mean, and its standard error: over the rounds
    with one pair of servers, over the pairs' means with several (rounds in a pair share
    its processes' luck, so they are not independent)."""
    ratios = round_ratios(runs, sides)
    pairs = [r["pair"] for r in runs if r["method"] == sides[0]]
    by_pair = [statistics.mean(r for r, p in zip(ratios, pairs, strict=True) if p == pair)
               for pair in sorted(set(pairs))]
    units = by_pair if len(by_pair) > 1 else ratios
    text = f"round by round: {' '.join(f'{r:.3f}' for r in ratios)}"
    if len(by_pair) > 1:
        text += f"; pair by pair: {' '.join(f'{r:.3f}' for r in by_pair)}"
    text += f"; mean {statistics.mean(units):.3f}"
    if len(units) > 1:
        text += (f", standard error {statistics.stdev(units) / len(units) ** 0.5:.3f}"
                 f" (over {'pairs' if len(by_pair) > 1 else 'rounds'})")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs=2, default=["vanilla", "amphista"],
                        choices=bench.METHODS, help="two bench methods, or one twice with "
                        "--env-b")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--before", type=int, help="requests at once right before each run")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per pair of servers")
    parser.add_argument("--pairs", type=int, default=1,
                        help="pairs of servers started one after the other")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--disable-by-batch-size", type=int, default=0,
                        help="as the bench's: no drafting above this many requests (0: the "
                        "step cost decides)")
    parser.add_argument("--env-b", nargs="+", default=[], metavar="NAME[=VALUE]",
                        help="the second server's environment: NAME=VALUE set, NAME unset "
                        "(one method twice: one engine under two settings)")
    parser.add_argument("--out", type=Path, default=Path("results/served_ab.json"))
    args = parser.parse_args()
    env_b = {name: value[0] if value else None
             for name, *value in (setting.split("=", 1) for setting in args.env_b)}
    method_a, method_b = args.methods
    if method_a == method_b and not env_b:
        parser.error("one method twice needs --env-b")
    # Each server by a name of its own: its method, the second's marked where they agree.
    side_b = method_b if method_b != method_a else f"{method_b}+env-b"
    sides = {method_a: (method_a, {}), side_b: (method_b, env_b)}
    batch_sizes = [args.concurrency, *([args.before] if args.before else [])]
    bench_args = argparse.ArgumentParser()
    bench.add_arguments(bench_args)
    bench_args = bench_args.parse_args([
        "--dtype", args.dtype, "--concurrency", *map(str, batch_sizes),
        "--disable-by-batch-size", str(args.disable_by_batch_size)])
    bench_args.target = export_smollm2()
    prompts = first_turns(None, limit=bench_args.num_prompts)
    runs: list[dict] = []
    for pair in range(args.pairs):
        pair_runs, served = run_pair(pair, sides, args, bench_args, prompts)
        runs += pair_runs
    rows = []
    for side in sides:
        mine = [r for r in runs if r["method"] == side]
        speeds = [r["tokens_per_s"] for r in mine]
        cpu = {name: statistics.mean(r["cpu_s"].get(name, 0.0) for r in mine)
               for name in mine[0]["cpu_s"]}
        idle = statistics.mean(sum(r["idle_server_cpu_s"].values()) for r in mine)
        rows.append([side, f"{statistics.mean(speeds):.1f}",
                     " / ".join(f"{s:.1f}" for s in speeds),
                     sum(r["drafts"] for r in mine),
                     ", ".join(f"{name} {s:.2f}" for name, s in cpu.items()), f"{idle:.3f}"])
    table = markdown_table(["method", "tokens/s", "runs", "drafts", "CPU s a run",
                            "the idle server's CPU s"], rows)
    table += f"\n\n{side_b} over {method_a}, " + ratio_summary(runs, list(sides))
    write_report(args.out, {"concurrency": args.concurrency, "before": args.before,
                            "temperature": args.temperature, "target_dtype": args.dtype,
                            "disable_by_batch_size": args.disable_by_batch_size or None,
                            "env_b": {side_b: env_b}, "pairs": args.pairs,
                            "ratios_by_round": round_ratios(runs, list(sides)),
                            "environment": bench.environment(), "runs": runs}, served)
    print(machine_line(served, target=args.dtype) + f"; {args.concurrency} requests, "
          f"T={args.temperature:g}" + (f", each run after {args.before}" if args.before
                                       else "") + "\n\n" + table)


if __name__ == "__main__":
    main()
