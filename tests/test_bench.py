"""`vllm-amphista bench`: counters, summary arithmetic, and one real end-to-end run."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine_helpers import IN_PROCESS, engine_env
from vllm_amphista.cli import demo_verdict
from vllm_amphista.eval import bench
from vllm_amphista.eval.bench import (
    FLIP_CHECK_CONCURRENCY,
    Run,
    excess_flips_p,
    first_difference,
    flip_check_concurrency,
    flip_record,
    greedy_verdict,
    markdown,
    methods_in_turn,
    percentile,
    server_args,
    spec_counters,
    summarise,
)
from vllm_amphista.eval.server import worker_cores
from vllm_amphista.machine import served_worker_binding

METRICS_PAGE = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 172.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e+09
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 17.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 1.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 16.0
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""


def test_spec_counters_reads_drafts_and_positions_in_order():
    assert spec_counters(METRICS_PAGE) == (172, [16, 1])
    assert spec_counters("vllm:num_requests_running 0.0\n") == (0, [])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sampled_runs_generate_max_tokens_for_every_method(monkeypatch, temperature):
    """Sampled answers differ from run to run and method to method, and so would their
    lengths: at T > 0 every request runs to max_tokens; greedy ones stop where they end."""
    sent = []

    def post_json(url, payload, timeout):
        sent.append(payload)
        return {"choices": [{"token_ids": [1] * payload["max_tokens"]}]}

    monkeypatch.setattr(bench, "post_json", post_json)
    monkeypatch.setattr(bench, "get_text", lambda url: METRICS_PAGE)
    run = bench.measure("http://server", ["a", "b", "c"], 2, temperature, 8, top_p=0.9)
    assert len(sent) == 3 and len(run.outputs) == 3
    assert all(p["ignore_eos"] is (temperature > 0) and p["max_tokens"] == 8
               and p["temperature"] == temperature for p in sent)
    assert all(p["top_p"] == (0.9 if temperature > 0 else 1.0) for p in sent)


def test_servers_warm_up_every_batch_size_up_to_each_concurrency(monkeypatch):
    """A server's first steps at a batch size pay one-off costs: for each measured
    concurrency, that many requests at once, unmeasured, of lengths that end them one by
    one (EOS ignored), so the batch runs every size from the concurrency down to one."""
    sent = []
    monkeypatch.setattr(bench, "post_json", lambda url, payload, timeout: sent.append(payload))
    bench.warm_up("http://server", ["a", "b", "c", "d", "e"], [1, 4, 16])
    lengths = sorted(p["max_tokens"] for p in sent)
    step = bench.WARM_UP_TOKENS
    assert lengths == sorted([step] + [step * i for i in range(1, 5)]
                             + [step * i for i in range(1, 17)])
    assert all(p["ignore_eos"] and p["temperature"] == 0.0 for p in sent)


# What vLLM 0.32's CPU worker logs as `vllm serve` starts on a 2-core machine.
BINDING_LOG = """\
(EngineCore pid=3016) INFO [ompmultiprocessing.py:185] \tlocal_world_size=1, reserve_cpu_num=1
(EngineCore pid=3016) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]
(EngineCore pid=3016) INFO [ompmultiprocessing.py:185] \treserved_cpus=[1]
"""


def test_worker_cores_reads_the_binding_vllm_logged():
    assert worker_cores(BINDING_LOG) == 1
    assert worker_cores(BINDING_LOG.replace("core ids=[0]", "core ids=[0, 1, 2]")) == 3
    assert worker_cores("no binding here") is None


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.9) == 9.0


def _run(tps: float, outputs, drafts=0, accepted=()):
    return Run(tokens_per_s=tps, latencies=[1.0, 2.0], outputs=outputs, drafts=drafts,
               accepted_per_position=list(accepted))


def test_summarise_speedup_tau_and_lossless_flag():
    same, other = [[1, 2], [3]], [[1, 2], [4]]
    rows = summarise({
        ("vanilla", 0.0, 1): [_run(10.0, same), _run(12.0, same)],
        ("amphista", 0.0, 1): [_run(15.0, same, 10, (5, 2)), _run(15.6, same, 10, (3, 0))],
        ("medusa", 0.0, 1): [_run(11.0, other, 4, (1, 0))],
        ("vanilla", 0.7, 1): [_run(10.0, other)],
        ("amphista", 0.7, 1): [_run(9.0, same, 2, (1, 1))],
    })
    by = {(r["method"], r["temperature"]): r for r in rows}
    amphista = by[("amphista", 0.0)]
    assert amphista["speedup"] == pytest.approx(15.3 / 11.0)
    assert amphista["speedup_runs"] == pytest.approx([1.5, 1.3])  # each repeat's own pair
    assert amphista["tau"] == pytest.approx(1 + 10 / 20)
    assert amphista["acceptance_per_position"] == pytest.approx([0.4, 0.1])
    assert amphista["tokens_per_s_stdev"] == pytest.approx(0.4243, abs=1e-3)
    assert amphista["identical_to_vanilla"] is True
    assert by[("medusa", 0.0)]["identical_to_vanilla"] is False
    assert by[("medusa", 0.0)]["mismatched_prompts"] == [1]
    assert "identical_to_vanilla" not in by[("amphista", 0.7)]  # sampled: not compared
    table = markdown(rows)
    assert "NO (1 prompts; per run 1; 500.0 flips / 1k tokens)" in table
    assert "| amphista | 0 | 1 | 15.3 ± 0.4 | 1.39x (1.30-1.50) |" in table
    assert "| medusa | 0 | 1 | 11.0 ± 0.0 | 1.00x |" in table  # one repeat: no spread
    assert "| vanilla | 0 | 1 | 11.0 ± 1.4 | 1.00x |" in table  # itself: no spread


def test_flips_are_counted_per_run_and_per_token_matched():
    """Two runs that each part from the reference on one prompt, not the same one: two
    prompts in the union, one per run; the rate counts every token that matched before a
    flip (or to the end), so repeating a run changes it only by what the runs did."""
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    runs = [_run(1.0, [[1, 2, 9, 9], [5, 6, 7, 8]]), _run(1.0, [[1, 2, 3, 4], [5, 9]])]
    record = flip_record(runs, reference)
    assert record["mismatched_prompts"] == [0, 1]
    assert record["mismatched_per_run"] == [1, 1]
    assert record["first_differences"] == [1, 2]
    # run 1: 2 tokens before its flip + 4 of a whole answer; run 2: 4 + 1.
    assert record["flips_per_1k_tokens"] == pytest.approx(1e3 * 2 / 11)
    assert first_difference([5, 6], [5, 6, 7]) == 2  # ending early is a difference
    assert flip_record(runs[:1] * 3, reference)["flips_per_1k_tokens"] == pytest.approx(
        1e3 / 6)


def _answers(flip_at: list[int | None], length: int = 100) -> list[list[int]]:
    """Greedy answers of `length` tokens, the i-th parting from _REFERENCE at flip_at[i]."""
    return [[t if at is None or j < at else -1 for j, t in enumerate(ref[:length])]
            for ref, at in zip(_REFERENCE, flip_at, strict=False)]


_REFERENCE = [list(range(100 * i, 100 * i + 100)) for i in range(16)]


def test_excess_flips_p_is_the_binomial_tail():
    """Given both cells' flips, the method's count is binomial with its share of the
    matched tokens: 5 flips of 5 at a share of 1/2 is 1/32; none is certain."""
    assert excess_flips_p(5, 100, 0, 100) == pytest.approx(1 / 32)
    tail = sum(math.comb(40, k) / 2 ** 40 for k in range(30, 41))
    assert excess_flips_p(30, 1000, 10, 1000) == pytest.approx(tail)
    assert excess_flips_p(0, 100, 5, 100) == 1.0
    assert excess_flips_p(3, 0, 5, 100) == 0.0  # every answer flipped at its first token
    assert excess_flips_p(3, 100, 5, 0) == 1.0  # ... vanilla's did


def test_bf16_is_held_to_vanillas_own_flip_rate_not_its_count_of_prompts():
    """Vanilla at 4 requests parts from vanilla alone on 13 of 16 answers at token 70; a
    method parting on 14 at token 70 flips at about vanilla's rate (one prompt over its
    count, which is at the ceiling) and passes; one parting on 14 at token 10 flips four
    times as often per token and fails. float32: any difference fails."""
    runs = {("vanilla", 0.0, 1): [_run(10.0, _REFERENCE)],
            ("vanilla", 0.0, 4): [_run(30.0, _answers([70] * 13 + [None] * 3))],
            ("amphista", 0.0, 1): [_run(12.0, _answers([70] * 14 + [None] * 2))]}
    ok, line = greedy_verdict(summarise(runs), "bfloat16")
    assert ok and "no more often than vanilla's own" in line and "at 4 requests" in line
    assert greedy_verdict(summarise(runs), "float32")[0] is False
    runs[("amphista", 0.0, 4)] = [_run(31.0, _answers([10] * 14 + [None] * 2))]
    ok, line = greedy_verdict(summarise(runs), "bfloat16")
    assert not ok and "amphista at 4 requests 41.2 flips per 1000" in line
    same = {("vanilla", 0.0, 1): [_run(10.0, _REFERENCE)],
            ("amphista", 0.0, 1): [_run(9.0, _REFERENCE)]}
    assert greedy_verdict(summarise(same), "float32") == (
        True, "temperature 0: every method produced vanilla's tokens")


def test_bf16_reference_is_vanillas_most_flipping_concurrency():
    """Verifying several tokens a request, a method's batches are as tall as vanilla's at
    a higher concurrency, and so are its flips: it is held to vanilla's worst cell (16
    requests here), not to the one at its own concurrency."""
    runs = {("vanilla", 0.0, 1): [_run(10.0, _REFERENCE)],
            ("vanilla", 0.0, 4): [_run(30.0, _answers([90] * 4 + [None] * 12))],
            ("vanilla", 0.0, 16): [_run(60.0, _answers([40] * 14 + [None] * 2))],
            ("amphista", 0.0, 4): [_run(31.0, _answers([40] * 14 + [None] * 2))]}
    ok, line = greedy_verdict(summarise(runs), "bfloat16")
    assert ok and "at 16 requests" in line
    del runs[("vanilla", 0.0, 16)]
    assert greedy_verdict(summarise(runs), "bfloat16")[0] is False


def test_vanilla_without_async_scheduling_flips_as_vanilla_does():
    """`vanilla-sync` is vanilla (on a CPU the very same engine): its bf16 flips are
    vanilla's own, it is not held to them, and a method may flip as often."""
    runs = {("vanilla", 0.0, 1): [_run(10.0, _REFERENCE)],
            ("vanilla", 0.0, 4): [_run(30.0, _answers([90] * 2 + [None] * 14))],
            ("vanilla-sync", 0.0, 4): [_run(30.0, _answers([30] * 14 + [None] * 2))],
            ("amphista", 0.0, 4): [_run(31.0, _answers([30] * 14 + [None] * 2))]}
    assert greedy_verdict(summarise(runs), "bfloat16")[0] is True
    del runs[("vanilla-sync", 0.0, 4)]
    assert greedy_verdict(summarise(runs), "bfloat16")[0] is False


def test_greedy_outputs_are_held_to_vanilla_alone_without_concurrency_1():
    """A bench of 4 and 16 requests only: vanilla's outputs with each prompt alone (run
    apart) are the reference, so vanilla's own bf16 flips at 4 are counted and a method
    flipping as often passes; without that reference vanilla at 4 would be compared with
    itself, count none, and fail the method."""
    batched = _answers([50] * 8 + [None] * 8)
    runs = {("vanilla", 0.0, 4): [_run(30.0, batched)],
            ("amphista", 0.0, 4): [_run(31.0, _answers([None] * 8 + [50] * 8))]}
    rows = {r["method"]: r for r in summarise(runs, _REFERENCE)}
    assert rows["vanilla"]["mismatched_prompts"] == list(range(8))
    assert rows["amphista"]["mismatched_prompts"] == list(range(8, 16))
    assert greedy_verdict(list(rows.values()), "bfloat16")[0] is True
    assert greedy_verdict(summarise(runs), "bfloat16")[0] is False


def test_bf16_flips_of_vanilla_counted_apart_where_only_one_request_is_benched():
    """A bf16 bench of one request at a time: vanilla's own flip rate comes from its run
    at another concurrency, counted apart (the bench runs it unmeasured)."""
    runs = {("vanilla", 0.0, 1): [_run(10.0, _REFERENCE)],
            ("amphista", 0.0, 1): [_run(14.0, _answers([60] * 12 + [None] * 4))]}
    assert greedy_verdict(summarise(runs), "bfloat16")[0] is False
    alike = flip_record([_run(0.0, _answers([60] * 12 + [None] * 4))], _REFERENCE)
    assert greedy_verdict(summarise(runs), "bfloat16", alike)[0] is True
    rarer = flip_record([_run(0.0, _answers([95] * 3 + [None] * 13))], _REFERENCE)
    assert greedy_verdict(summarise(runs), "bfloat16", rarer)[0] is False
    assert greedy_verdict(summarise(runs), "float32", alike)[0] is False


def test_servers_of_a_bf16_bench_of_one_request_take_the_flip_checks_batch():
    """vanilla's unmeasured run that counts its own bf16 flips sends FLIP_CHECK_CONCURRENCY
    requests at once; servers that took one at a time (max-num-seqs 1, as a bench of
    concurrency 1 started them) ran it as vanilla alone and counted no flips."""
    args = argparse.Namespace(target="t", dtype="bfloat16", concurrency=[1],
                              temperature=[0.0, 0.7], methods=["vanilla", "amphista"],
                              step_cost="auto", draft_dtype="auto", k=0,
                              disable_by_batch_size=0, amphista_heads="h", medusa_heads="m")

    def max_num_seqs(**changes) -> int:
        argv = server_args("amphista", argparse.Namespace(**{**vars(args), **changes}))
        return int(argv[argv.index("--max-num-seqs") + 1])

    assert flip_check_concurrency(args) == FLIP_CHECK_CONCURRENCY > 1
    assert max_num_seqs() == FLIP_CHECK_CONCURRENCY
    assert max_num_seqs(dtype="float32") == 1  # fp32: every token must match, no count
    assert max_num_seqs(concurrency=[1, 16]) == 16
    assert flip_check_concurrency(argparse.Namespace(**{**vars(args), "concurrency": [1, 4]}
                                                     )) is None


def test_methods_take_turns_at_running_first():
    methods = ["vanilla", "amphista", "medusa"]
    assert methods_in_turn(methods, 0) == methods
    assert methods_in_turn(methods, 1) == ["medusa", "amphista", "vanilla"]
    assert methods_in_turn(methods, 2) == methods and methods == ["vanilla", "amphista", "medusa"]


def test_table_without_vanilla_has_no_speedup():
    """`bench --methods amphista`: no vanilla row to compare with, the table still prints."""
    rows = summarise({("amphista", 0.0, 1): [_run(15.0, [[1]], 10, (5, 2))]})
    assert rows[0]["speedup"] is None
    assert "| amphista | 0 | 1 | 15.0 ± 0.0 | - |" in markdown(rows)


@pytest.mark.engine
@pytest.mark.slow
def test_bench_command_end_to_end(tmp_path):
    """The real command on SmolLM2: a server per method, greedy and sampled, JSON/PNG/
    markdown. (vLLM's own Medusa on the exported heads is compared with our Medusa mode in
    tests/test_engine_amphista.py, without servers.)"""
    out = tmp_path / "bench"
    cmd = [str(Path(sys.executable).parent / "vllm-amphista"), "bench", "--methods",
           "vanilla", "amphista", "--num-prompts", "2", "--max-tokens", "16", "--concurrency",
           "2", "--temperature", "0", "0.7", "--repeats", "1", "--step-cost", "off", "--out",
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                          env=engine_env(VLLM_CPU_KVCACHE_SPACE="1", **IN_PROCESS))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "every method produced vanilla's tokens" in proc.stdout
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 10_000
    machine, blank, header = (out / "bench.md").read_text().splitlines()[:3]
    assert machine.startswith(report["machine"]["cpu"]) and machine.endswith(
        "; target float32; draft " + report["draft_dtype"])
    assert blank == "" and header.startswith("| method |")
    # The servers' threads as vLLM's log states them (in-process servers, as here, do not
    # state them: "?"), not the bench process's own.
    threads = worker_cores("".join(log.read_text()
                                   for log in out.glob("vllm-amphista-server-*.log")))
    assert report["machine"]["torch_threads"] == threads
    assert f" {threads or '?'} torch threads" in machine
    assert report["environment"]["vllm"].startswith("0.32.0")
    # The binding the servers started under: the test worker's core, or the bench's own.
    assert report["environment"]["engine"].get("VLLM_CPU_OMP_THREADS_BIND") == (
        os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or served_worker_binding())
    rows = {(r["method"], r["temperature"]): r for r in report["rows"]}
    assert set(rows) == {(m, t) for m in ("vanilla", "amphista") for t in (0.0, 0.7)}
    greedy = rows[("amphista", 0.0)]
    assert greedy["identical_to_vanilla"] is True
    assert greedy["drafts"] > 0 and len(greedy["acceptance_per_position"]) == 4
    assert greedy["tokens_per_s"] > 0 and greedy["speedup"] > 0
    assert greedy["tau"] > 1.0
    assert rows[("amphista", 0.7)]["drafts"] > 0


def test_demo_says_why_amphista_was_as_fast_as_it_was():
    slower = demo_verdict(0.9, drafts=100, accepted=[20, 5, 0, 0])
    assert "tau 1.25" in slower and "0.20 0.05 0.00 0.00" in slower and "SLOWER" in slower
    assert "faster than plain" in demo_verdict(1.1, drafts=100, accepted=[60, 30, 10, 0])
    assert "drafted in no step" in demo_verdict(0.98, drafts=0, accepted=[])
