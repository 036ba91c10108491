"""bf16 against fp32 on this machine: the measurements behind vllm_amphista.machine.

    python -m benchmarks.dtype_speed --out runs/dtype_speed.json

For each dtype: the Amphista draft pass (the shipped heads, one new position per request
against a 200-position SAL cache, 1 and 16 requests), a teacher-forced transformers forward
of the target (training and data building), and vanilla vLLM decoding (one request, and
16 at once). Writes JSON with the machine's description and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from vllm_amphista.eval.calibrate import measure_draft_pass
from vllm_amphista.eval.report import machine_line, result_from, write_report
from vllm_amphista.machine import DTYPE_NAMES, compute_dtype
from vllm_amphista.model.target import export_smollm2
from vllm_amphista.paths import SHIPPED_HEADS
from vllm_amphista.prompts import first_turns


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def teacher_forcing_tokens_per_s(target: Path, dtype: torch.dtype, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype).eval()
    ids = torch.randint(0, 1000, (8, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ms = _median_ms(lambda: model(ids, output_hidden_states=True), repeats)
    return ids.numel() / ms * 1000


def vllm_decode_tokens_per_s(target: Path, dtype: str, batch: int, max_tokens: int) -> float:
    """In a subprocess: vLLM's CPU engine cannot start twice in one process."""
    import subprocess
    import sys

    code = f"""
import time
from vllm import LLM, SamplingParams
from vllm_amphista.eval.report import print_result
from vllm_amphista.prompts import first_turns
llm = LLM(model={str(target)!r}, dtype={dtype!r}, enforce_eager=True, max_model_len=2048,
          seed=0)
prompts = [[{{"role": "user", "content": q}}] for q in first_turns(limit={batch})]
params = SamplingParams(temperature=0.0, max_tokens={max_tokens}, ignore_eos=True)
llm.chat(prompts[:1], SamplingParams(max_tokens=8), use_tqdm=False)
start = time.perf_counter()
outs = llm.chat(prompts, params, use_tqdm=False)
print_result(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start))
"""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=900)
    result = result_from(proc.stdout)
    if result is None:
        raise RuntimeError(f"vLLM run failed:\n{proc.stderr[-3000:]}")
    return float(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, help="target folder (default: SmolLM2 export)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--out", default="runs/dtype_speed.json")
    args = parser.parse_args(argv)
    target = args.target or export_smollm2()
    first_turns(limit=1)  # fail early if the prompts are missing
    rows = []
    for name, dtype in DTYPE_NAMES.items():
        row = {"dtype": name,
               **{f"draft_pass_ms_{m['requests']}": m["ms"] for m in
                  measure_draft_pass(target, SHIPPED_HEADS / "amphista", dtype, [1, 16],
                                     repeats=args.repeats)},
               "teacher_forcing_tokens_per_s": teacher_forcing_tokens_per_s(
                   target, dtype, max(3, args.repeats // 10))}
        if not args.skip_vllm:
            row["vllm_decode_tokens_per_s_1"] = vllm_decode_tokens_per_s(
                target, name, 1, args.max_tokens)
            row["vllm_decode_tokens_per_s_16"] = vllm_decode_tokens_per_s(
                target, name, 16, args.max_tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_report(args.out, {"compute_dtype": str(compute_dtype()), "rows": rows})
    print("\n" + machine_line(compute_dtype=compute_dtype()))
    keys = [k for k in rows[0] if k != "dtype"]
    print("| dtype | " + " | ".join(keys) + " |")
    print("| --- |" + " ---: |" * len(keys))
    for row in rows:
        print(f"| {row['dtype']} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
