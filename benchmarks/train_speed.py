"""Training throughput on recorded SmolLM2 conversations: a fresh draft model, a fixed
number of optimizer steps, conversation tokens per second (what `tok_s` in the training
bar and `tokens_per_second` in metrics.json count). Writes JSON and prints a table.
Reads the first shard of `vllm-amphista data` (or `--shard`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from vllm_amphista.eval.report import machine_line, markdown_table, write_report
from vllm_amphista.machine import compute_dtype
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.training.data import load_dataset, sharegpt_plan
from vllm_amphista.training.heads import draft_model_for
from vllm_amphista.training.loop import train
from vllm_amphista.training.settings import TrainSettings


def measure(shard: Path, conversations: int, batch: int, dtype: str, medusa: bool) -> dict:
    target_dir = export_smollm2()
    target = TargetWeights.from_folder(target_dir)
    data = load_dataset(shard)[: conversations + 1]
    model = draft_model_for(target_dir, target, data, medusa=medusa, draft_vocab=8192, seed=0)
    settings = TrainSettings(epochs=1, batch_conversations=batch, compute_dtype=dtype,
                             eval_fraction=0.0, checkpoint_every=10 ** 6)
    with tempfile.TemporaryDirectory() as work:
        record = train(model, target.lm_head.float(), data[:conversations], data[-1:],
                       settings, Path(work))
    return {"mode": "medusa" if medusa else "amphista", "dtype": dtype, "batch": batch,
            "conversations": conversations,
            "tokens_per_second": record["tokens_per_second"],
            "train_seconds": record["wall_s_this_run"]}


def first_shard() -> Path:
    plan = sharegpt_plan(export_smollm2(), 256, 256, dtype=compute_dtype())
    if plan.missing_shards():
        raise SystemExit(f"{plan.shard_path(0)} is missing: run `vllm-amphista data "
                         "--num-prompts 256` first")
    return plan.shard_path(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", type=Path, help="a recorded data shard")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["auto"])
    parser.add_argument("--medusa", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/train_speed.json"))
    args = parser.parse_args(argv)
    shard = args.shard or first_shard()
    rows = [measure(shard, args.conversations, args.batch, dtype, args.medusa)
            for dtype in args.dtypes]
    write_report(args.out, {"torch": torch.__version__, "rows": rows})
    print(machine_line())
    print(markdown_table(
        ["mode", "dtype", "batch", "conversations", "tokens/s", "seconds"],
        [[r["mode"], r["dtype"], r["batch"], r["conversations"],
          f"{r['tokens_per_second']:.0f}", f"{r['train_seconds']:.1f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
