"""Serving speed under the dtype defaults before and after the CPU rule (machine.py).

    python -m benchmarks.cpu_defaults --out results/cpu_defaults-<kind>.json

Before the rule the draft model computed in the target's dtype; now it computes in the
machine's (bf16 only where the CPU computes it natively). Three `vllm-amphista bench`
runs, vanilla and Amphista side by side in each, T=0, one request at a time and a batch:
  target bf16, draft bf16    a user's `vllm serve` (dtype auto) before the rule
  target bf16, draft auto    the same user now (the server also warns on such a CPU)
  target fp32, draft auto    the project's own commands (demo, bench), before and after
                             alike on an AVX2-only CPU: the draft followed the fp32 target
Every run verifies all K drafts in every step (--step-cost off), so that the rows differ in
their dtypes only. Writes JSON (each bench's rows and the machine) and prints one table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from vllm_amphista.eval.report import machine_line, markdown_table, write_report

CONFIGS = {  # name -> (target dtype, draft dtype)
    "target bf16, draft bf16 (before)": ("bfloat16", "bfloat16"),
    "target bf16, draft auto (after)": ("bfloat16", "auto"),
    "target fp32, draft auto (project defaults)": ("float32", "auto"),
}


def run_bench(target_dtype: str, draft_dtype: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "vllm_amphista.cli", "bench", "--methods", "vanilla",
           "amphista", "--temperature", "0", "--repeats", str(args.repeats),
           "--concurrency", *map(str, args.concurrency), "--num-prompts",
           str(args.num_prompts), "--max-tokens", str(args.max_tokens), "--dtype",
           target_dtype, "--draft-dtype", draft_dtype, "--step-cost", "off", "--out", str(out)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "bench.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("runs/cpu_defaults.json"))
    args = parser.parse_args(argv)
    benches = {}
    for i, name in enumerate(args.configs):
        benches[name] = run_bench(*CONFIGS[name], args, Path("runs/cpu_defaults") / str(i))
    rows = [[name, row["method"], row["concurrency"], f"{row['tokens_per_s']:.1f}",
             "-" if row["tau"] is None else f"{row['tau']:.2f}",
             {True: "yes", False: "NO", None: "-"}[row.get("identical_to_vanilla")]]
            for name, bench in benches.items()
            for row in sorted(bench["rows"], key=lambda r: (r["concurrency"], r["method"]))]
    write_report(args.out, {"num_prompts": args.num_prompts,
                            "max_tokens": args.max_tokens, "temperature": 0.0,
                            "configs": {name: {"target_dtype": CONFIGS[name][0],
                                               "draft_dtype": bench["draft_dtype"],
                                               "rows": bench["rows"]}
                                        for name, bench in benches.items()}})
    print("\n" + machine_line())
    print(markdown_table(["dtypes", "method", "concurrency", "tokens/s", "tau",
                          "same tokens as vanilla"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
