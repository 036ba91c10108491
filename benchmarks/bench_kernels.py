"""Check every Triton kernel against its PyTorch reference and time it against PyTorch.

Needs only torch + triton (no vLLM). On a CUDA machine:

    python -m benchmarks.bench_kernels --out runs/kernels.json

compares, per shape, the kernel with PyTorch eager (the fp32 reference) and SDPA,
printing a table and writing JSON with the device and versions. `--smoke` runs two
tiny shapes anywhere (CPU under TRITON_INTERPRET=1) to check the script itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from vllm_amphista.eval.report import machine_line, write_report
from vllm_amphista.kernels.head_attention import head_attention_reference
from vllm_amphista.kernels.tree_attention import tree_attention_reference
from vllm_amphista.reference.tree import build_tree

# (K, batch, d, heads): AEB shapes over the K draft heads.
HEAD_SHAPES = [(k, b, d, d // 128) for k in (4, 5, 8) for b in (1, 64, 1024)
               for d in (576, 4096, 8192)]
# (tree nodes, prefix, q_heads, kv_heads, head_dim): reference-decoder verification shapes.
TREE_SHAPES = [(t, p, hq, hkv, 128) for t in (16, 32, 64) for p in (128, 1024, 4096)
               for hq, hkv in ((32, 8), (64, 8))]
SMOKE_HEAD_SHAPES = [(4, 3, 64, 2), (5, 2, 96, 3)]
SMOKE_TREE_SHAPES = [(6, 20, 4, 2, 32)]


def _time(fn, args: tuple, device: str, repeats: int) -> float:
    """Median seconds per call of fn(*args)."""
    for _ in range(3):
        fn(*args)
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def _tree_sdpa(q, kp, vp, kt, vt, mask):
    groups = q.shape[1] // kp.shape[1]
    keys = torch.cat((kp, kt), 2).repeat_interleave(groups, 1)
    values = torch.cat((vp, vt), 2).repeat_interleave(groups, 1)
    visible = torch.cat((mask.new_ones(mask.shape[0], kp.shape[2]), mask), 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


def bench(device: str, dtype: torch.dtype, smoke: bool, repeats: int) -> list[dict]:
    from vllm_amphista.kernels.triton_head_attention import triton_head_attention
    from vllm_amphista.kernels.triton_tree_attention import triton_tree_attention
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    rows = []
    for k, batch, d, heads in SMOKE_HEAD_SHAPES if smoke else HEAD_SHAPES:
        q, key, v = (torch.randn(batch, heads, k, d // heads, device=device, dtype=dtype)
                     for _ in range(3))
        want = head_attention_reference(q, key, v)
        error = (triton_head_attention(q, key, v).float() - want.float()).abs().max().item()
        rows.append({"kernel": "head_attention", "shape": f"K={k} B={batch} d={d} H={heads}",
                     "max_error": error, "ok": error <= tol,
                     "triton_s": _time(triton_head_attention, (q, key, v), device, repeats),
                     "eager_s": _time(head_attention_reference, (q, key, v), device, repeats),
                     "sdpa_s": _time(F.scaled_dot_product_attention, (q, key, v), device,
                                     repeats)})
    for nodes, prefix, hq, hkv, hd in SMOKE_TREE_SHAPES if smoke else TREE_SHAPES:
        paths = [(i,) for i in range(min(nodes - 1, 10))]
        paths += [(i, j) for i in range(10) for j in range(10)][: nodes - 1 - len(paths)]
        mask = build_tree(paths, top_k=10).mask.to(device)
        q = torch.randn(1, hq, nodes, hd, device=device, dtype=dtype)
        kp, vp = (torch.randn(1, hkv, prefix, hd, device=device, dtype=dtype) for _ in "kv")
        kt, vt = (torch.randn(1, hkv, nodes, hd, device=device, dtype=dtype) for _ in "kv")
        args = (q, kp, vp, kt, vt, mask)
        error = (triton_tree_attention(*args).float()
                 - tree_attention_reference(*args).float()).abs().max().item()
        rows.append({"kernel": "tree_attention",
                     "shape": f"T={nodes} P={prefix} Hq={hq} Hkv={hkv} hd={hd}",
                     "max_error": error, "ok": error <= tol,
                     "triton_s": _time(triton_tree_attention, args, device, repeats),
                     "eager_s": _time(tree_attention_reference, args, device, repeats),
                     "sdpa_s": _time(_tree_sdpa, args, device, repeats)})
    for row in rows:
        row["speedup_vs_best_torch"] = min(row["eager_s"], row["sdpa_s"]) / row["triton_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/kernels.json")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="two tiny shapes, any device")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA device: timings need a GPU (use --smoke to check the script)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("on CPU, run with TRITON_INTERPRET=1")
    import triton

    rows = bench(device, getattr(torch, args.dtype), args.smoke, args.repeats)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
              "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
              "smoke": args.smoke, "rows": rows}
    write_report(args.out, report)
    print(machine_line(dtype=args.dtype))
    print(f"{'kernel':<15} {'shape':<34} {'err':>8} {'triton us':>10} {'eager us':>10} "
          f"{'sdpa us':>10} {'vs best':>8}")
    for r in rows:
        print(f"{r['kernel']:<15} {r['shape']:<34} {r['max_error']:>8.1e} "
              f"{r['triton_s'] * 1e6:>10.1f} {r['eager_s'] * 1e6:>10.1f} "
              f"{r['sdpa_s'] * 1e6:>10.1f} {r['speedup_vs_best_torch']:>7.2f}x")
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
