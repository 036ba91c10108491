"""Where the draft pass's time goes: each weight product, and everything around them.

    python -m benchmarks.draft_pass [--heads H] [--requests 1 4 16] [--cached 200]
                                    [--rows 1] [--drafted-heads N] [--int8-rows N]
                                    [--passes 60] [--flush-mb N] [--threads N]
                                    [--out results/draft_pass.json]

The heads' draft pass (`AmphistaDraftModel.extend`: `--rows` new rows per request, one
more than the drafts it accepted, against `--cached` positions each) as the proposer
runs it: weights packed, this machine's draft dtype, the threads a served worker
computes with here (`--threads`). Before every pass a buffer twice the size of the
last-level cache (`--flush-mb`, default from this CPU's sysfs) is rewritten, as in serving,
where the target's forward reads ~0.5 GB between two passes, so the draft weights are
read from memory every time. Three ways, taking turns pass by pass: the whole pass; the
pass with each packed product timed (its bytes, ms, GB/s); the pass with every product
replaced by an empty result of its shape (what the operations around the products cost);
the pass without logits (`logits=False`: the SAL caches only, what a paused proposer's
warm-up before a probe costs). Medians. JSON + table. `--int8-rows 0` times the pass
with bf16 weights only, for comparison with the int8 ones a few rows read here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import vllm._custom_ops  # noqa: F401  (vLLM's CPU kernels, loaded in a server's worker)

from vllm_amphista.eval.report import machine_line, markdown_table, write_report
from vllm_amphista.kernels.packed_linear import PackedLinear
from vllm_amphista.machine import compute_dtype, served_worker_threads
from vllm_amphista.model.checkpoint import load_checkpoint
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.paths import SHIPPED_HEADS

MODES = ("whole", "products", "without products", "cache only")


def flush_mb(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Twice this CPU's largest cache in MB (sysfs), 64 where it cannot be read (twice the
    32 MB L3 of the 2-core EPYCs). An Intel Xeon with AMX here has a 480 MB L3, which a
    64 MB buffer does not flush (the pass at one request: 6.9 ms after one, 8.3 after a
    1 GB one)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = [int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
             for text in (f.read_text().strip() for f in caches.glob("index*/size"))]
    return 2 * max(sizes) >> 20 if sizes else 64


def measure(model, requests: int, cached: int, passes: int, flush: int, rows: int = 1
            ) -> dict:
    """flush: MB rewritten before every pass; rows: new rows per request."""
    d, dtype = model.config.hidden_size, compute_dtype()
    cache = model.new_cache()
    model.extend(cache, torch.randn(requests * cached, d, dtype=dtype),
                 torch.randint(0, model.config.vocab_size, (requests * cached,)),
                 np.full(requests, cached))
    names = {id(m): name for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    flush_buffer = torch.zeros((flush << 20) // 4)
    product_ms: dict[str, list[float]] = defaultdict(list)
    product_rows: dict[str, int] = {}
    forward = PackedLinear.forward

    def timed(self, x):
        started = time.perf_counter()
        try:
            return forward(self, x)
        finally:
            product_ms[names[id(self)]].append(1e3 * (time.perf_counter() - started))
            product_rows[names[id(self)]] = x.numel() // x.shape[-1]

    def skipped(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for _ in range(passes + 5):  # the first 5 of each are warm-up
            for mode, product in zip(MODES, (forward, timed, skipped, forward), strict=True):
                PackedLinear.forward = product
                cache.lengths[:requests] -= rows  # the same positions every pass
                hidden = torch.randn(requests * rows, d, dtype=dtype)
                tokens = torch.randint(0, model.config.vocab_size, (requests * rows,))
                flush_buffer.add_(1.0)
                started = time.perf_counter()
                model.extend(cache, hidden, tokens, np.full(requests, rows),
                             logits=mode != "cache only")
                times[mode].append(1e3 * (time.perf_counter() - started))
    finally:
        PackedLinear.forward = forward
    per_product = []
    for name, module in ((names[id(m)], m) for m in model.modules()
                         if isinstance(m, PackedLinear) and product_ms[names[id(m)]]):
        ms, rows = statistics.median(product_ms[name][5:]), product_rows[name]
        mb = module.bytes_read(rows) / 1e6
        per_product.append({"product": name, "rows": rows,
                            "int8": module.reads_int8(rows), "mb": mb, "ms": ms,
                            "gb_per_s": mb / ms})
    return {"requests": requests, "cached": cached, "rows": rows,
            **{f"{mode.replace(' ', '_')}_ms": statistics.median(times[mode][5:])
               for mode in MODES},
            "products_ms": sum(p["ms"] for p in per_product),
            "weight_mb": sum(p["mb"] for p in per_product), "per_product": per_product}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=Path, default=SHIPPED_HEADS / "amphista")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--cached", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1,
                        help="new rows per request a pass (1 + the drafts accepted)")
    parser.add_argument("--drafted-heads", type=int,
                        help="the leading heads drafted (default: all; a server left to "
                             "choose drafts those that pay here, see its log)")
    parser.add_argument("--int8-rows", type=int,
                        help="the most rows a product reads int8 weights for (default: "
                             "this machine's choice; 0: never), at most that choice")
    parser.add_argument("--passes", type=int, default=60)
    parser.add_argument("--flush-mb", type=int, default=flush_mb(),
                        help="MB rewritten before every pass (default: twice the largest cache)")
    parser.add_argument("--threads", type=int, default=served_worker_threads(),
                        help="compute threads (default: a served worker's here)")
    parser.add_argument("--out", type=Path, default=Path("results/draft_pass.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.heads, TargetWeights.from_folder(export_smollm2()),
                            dtype=compute_dtype())
    if not model.pack_for_drafting():
        raise SystemExit("this machine cannot pack the draft weights: nothing to measure")
    model.draft_leading_heads(args.drafted_heads or model.config.num_heads)
    products = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if args.int8_rows is not None:
        for product in products:
            product.int8_rows = min(product.int8_rows, args.int8_rows)
    rows = [measure(model, n, args.cached, args.passes, args.flush_mb, args.rows)
            for n in args.requests]
    write_report(args.out, {"heads": str(args.heads), "drafted_heads": model.drafted_heads,
                            "int8_rows": max(product.int8_rows for product in products),
                            "passes": args.passes,
                            "flush_mb": args.flush_mb, "rows": rows})
    print(machine_line(draft=compute_dtype()))
    print(markdown_table(
        ["requests", "pass ms", "products ms (sum)", "without products ms",
         "cache only ms", "weights MB", "GB/s"],
        [[r["requests"], f"{r['whole_ms']:.2f}", f"{r['products_ms']:.2f}",
          f"{r['without_products_ms']:.2f}", f"{r['cache_only_ms']:.2f}",
          f"{r['weight_mb']:.1f}",
          f"{r['weight_mb'] / r['products_ms']:.1f}"] for r in rows]))
    print(f"\nproducts at {rows[0]['requests']} request(s):")
    print(markdown_table(["product", "rows", "weights", "MB", "ms", "GB/s"],
                         [[p["product"], p["rows"], "int8" if p["int8"] else "packed",
                           f"{p['mb']:.2f}", f"{p['ms']:.3f}",
                           f"{p['gb_per_s']:.1f}"] for p in rows[0]["per_product"]]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
