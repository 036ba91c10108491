"""Learning curve: held-out chain tau and vLLM tau (MT-Bench, K=4, T=0) against training
data, for Amphista and the Medusa mode on identical data and budget.

Every run trains on the leading shards of the `vllm-amphista data` set and is held out on
its last shards (never trained on, the same for every run: each run records them, and a
run held out on other shards, from a call with a larger --sizes, is refused rather than
mixed into the curve); each (mode, size) lands in
runs/learning_curve/<mode>-<size>/ and is skipped when already there, so the curve is
built across sessions: run the same command again. Writes results/learning_curve.json,
a plot and a table.

    vllm-amphista data                       # the 8192-conversation set, first
    python -m benchmarks.learning_curve      # then this (hours on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

from vllm_amphista.eval.acceptance import measure
from vllm_amphista.eval.report import machine_line, markdown_table, write_report
from vllm_amphista.machine import TARGET_DTYPE, compute_dtype
from vllm_amphista.model.checkpoint import save_checkpoint
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.prompts import first_turns
from vllm_amphista.training.data import load_shards, sharegpt_plan
from vllm_amphista.training.heads import draft_model_for
from vllm_amphista.training.loop import train
from vllm_amphista.training.settings import TrainSettings

SHARD = 256  # conversations per recorded shard
TAU_GOAL, RATIO_GOAL = 1.8, 1.25  # the heads issue's goals (vLLM tau, Amphista / Medusa)


def run(mode: str, shards: int, plan, held_out: tuple[list, list[int]],
        settings: TrainSettings, folder: Path, target_dir: Path, target: TargetWeights,
        vllm_tau: bool) -> None:
    """Train one (mode, size) point unless its heads exist; then its vLLM tau.
    held_out: the held-out conversations and the shard indices they come from."""
    heads = folder / "heads"
    metrics_path = folder / "metrics.json"
    held_out_set, held_out_shards = held_out
    if metrics_path.is_file():
        kept = json.loads(metrics_path.read_text()).get("held_out_shards")
        if kept != held_out_shards:  # points of one curve share one held-out set
            raise SystemExit(f"{folder} was evaluated on held-out shards {kept}, this curve "
                             f"on {held_out_shards}: pass --runs with another folder")
    else:
        train_set = load_shards(plan.shard_paths()[:shards])
        model = draft_model_for(target_dir, target, train_set, medusa=mode == "medusa",
                                draft_vocab=8192, seed=settings.seed)
        metrics = train(model, target.lm_head.float(), train_set, held_out_set, settings,
                        folder)
        metrics["held_out_shards"] = held_out_shards
        save_checkpoint(model.to(torch.bfloat16), heads)
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    vllm_path = folder / "vllm_tau.json"
    if vllm_tau and not vllm_path.is_file():
        vllm_path.write_text(json.dumps(measure(
            str(target_dir), str(heads), first_turns(limit=80), 128, batch=True), indent=2))
        gc.collect()  # the engine and its KV cache, before the next run


def finished_points(runs: Path) -> list[dict]:
    """Every point in `runs` with its metrics, from this and earlier invocations."""
    rows = []
    for metrics_path in sorted(runs.glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        vllm_path = metrics_path.parent / "vllm_tau.json"
        vllm = json.loads(vllm_path.read_text()) if vllm_path.is_file() else {}
        final = metrics["history"][-1]["eval"]
        rows.append({
            "run": metrics_path.parent.name, "mode": metrics_path.parent.name.split("-")[0],
            "conversations": metrics["train_conversations"],
            "train_tokens": metrics["train_tokens_per_epoch"] * metrics["settings"]["epochs"],
            "settings": metrics["settings"],
            "heldout_chain_tau": final["chain_tau"], "heldout_top1": final["top1"],
            "vllm_tau": vllm.get("tau"), "vllm_acceptance": vllm.get("acceptance_per_position"),
            "tokens_per_second": metrics.get("tokens_per_second")})
    return sorted(rows, key=lambda r: (r["mode"], r["train_tokens"]))


def log_linear(points: list[tuple[float, float]], goal: float) -> dict | None:
    """Least-squares y = intercept + slope * ln(x) through (x, y) points, and the x where it
    reaches `goal` (None if it never does: a flat or falling line). None for < 2 points."""
    if len(points) < 2:
        return None
    x = np.log([p[0] for p in points])
    slope, intercept = np.polyfit(x, [p[1] for p in points], 1)
    reach = float(np.exp((goal - intercept) / slope)) if slope > 0 else None
    return {"slope_per_e_fold": float(slope), "intercept": float(intercept), "goal": goal,
            "tokens_at_goal": reach}


def extrapolate(rows: list[dict], tau_goal: float, ratio_goal: float) -> dict:
    """Where the measured vLLM tau of each family, and the Amphista / Medusa ratio at
    equal data, would reach the issue's goals if they kept their log-linear trend."""
    measured = [r for r in rows if r["vllm_tau"] is not None]
    fits = {label: log_linear([(r["train_tokens"], r["vllm_tau"]) for r in measured
                               if family(r) == label], tau_goal)
            for label in sorted({family(r) for r in measured})}
    medusa = {(r["train_tokens"], family(r).replace("medusa", "")): r["vllm_tau"]
              for r in measured if r["mode"] == "medusa"}
    ratios = [(r["train_tokens"], r["vllm_tau"] / medusa[key])
              for r in measured if r["mode"] == "amphista"
              and (key := (r["train_tokens"], family(r).replace("amphista", ""))) in medusa]
    return {"vllm_tau": fits, "amphista_over_medusa": log_linear(ratios, ratio_goal),
            "ratios": ratios}


def family(row: dict) -> str:
    """A run's name without its size: the mode and any non-default settings."""
    mode, _size, *tag = row["run"].split("-")
    return "-".join([mode, *tag])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    families = sorted({family(r) for r in rows})
    for label in families:
        mine = sorted((r for r in rows if family(r) == label), key=lambda r: r["train_tokens"])
        marker = "o" if mine[0]["mode"] == "amphista" else "s"
        measured = [r for r in mine if r["vllm_tau"] is not None]
        if measured:
            ax.plot([r["train_tokens"] for r in measured], [r["vllm_tau"] for r in measured],
                    marker + "-", label=f"{label}: vLLM tau")
        ax.plot([r["train_tokens"] for r in mine], [r["heldout_chain_tau"] for r in mine],
                marker + ":", label=f"{label}: held-out chain tau")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("tau (tokens per target step, K=4, T=0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


CURVE_EPOCHS = 1  # the curve's budget: one pass over each size's data


def settings_tag(settings: TrainSettings) -> str:
    """The folder-name suffix of a run whose settings differ from the curve's defaults
    (so a run with other settings never reuses, or is mistaken for, a curve point)."""
    default = TrainSettings(epochs=CURVE_EPOCHS)
    return "".join(f"-{short}{getattr(settings, name):g}" for name, short in
                   (("epochs", "ep"), ("learning_rate", "lr"), ("lm_weight", "lmw"),
                    ("head_decay", "decay"), ("batch_conversations", "b"))
                   if getattr(settings, name) != getattr(default, name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 7680],
                        help="training conversations (whole shards of 256)")
    parser.add_argument("--held-out-shards", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["amphista", "medusa"])
    parser.add_argument("--epochs", type=int, default=CURVE_EPOCHS)
    defaults = TrainSettings()
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--lm-weight", type=float, default=defaults.lm_weight)
    parser.add_argument("--head-decay", type=float, default=defaults.head_decay)
    parser.add_argument("--batch", type=int, default=defaults.batch_conversations,
                        help="conversations per update")
    parser.add_argument("--no-vllm-tau", action="store_true",
                        help="held-out metrics only (for settings sweeps)")
    parser.add_argument("--runs", type=Path, default=Path("runs/learning_curve"))
    parser.add_argument("--out", type=Path, default=Path("results/learning_curve.json"))
    args = parser.parse_args(argv)

    target_dir = export_smollm2()
    target = TargetWeights.from_folder(target_dir)
    shards = [-(-size // SHARD) for size in args.sizes]
    plan = sharegpt_plan(target_dir, (max(shards) + args.held_out_shards) * SHARD, 256,
                         dtype=compute_dtype())
    if plan.missing_shards():
        raise SystemExit(f"{len(plan.missing_shards())} shards of {plan.folder} are missing: "
                         f"run `vllm-amphista data --num-prompts {len(plan.prompts)}` first")
    held_out_shards = list(range(plan.num_shards - args.held_out_shards, plan.num_shards))
    held_out = load_shards([plan.shard_paths()[i] for i in held_out_shards])
    settings = TrainSettings(epochs=args.epochs, learning_rate=args.learning_rate,
                             lm_weight=args.lm_weight, head_decay=args.head_decay,
                             batch_conversations=args.batch)
    for size in shards:
        for mode in args.modes:
            started = time.perf_counter()
            name = f"{mode}-{size * SHARD}{settings_tag(settings)}"
            run(mode, size, plan, (held_out, held_out_shards), settings, args.runs / name,
                target_dir, target, vllm_tau=not args.no_vllm_tau)
            print(f"{name} done ({time.perf_counter() - started:.0f}s)", flush=True)
            rows = finished_points(args.runs)
            write_report(args.out, {"held_out_conversations": len(held_out),
                                    "held_out_shards": held_out_shards, "rows": rows,
                                    "extrapolation": extrapolate(rows, TAU_GOAL, RATIO_GOAL)})
            plot(rows, args.out.with_suffix(".png"))
    rows = finished_points(args.runs)
    print(machine_line(target=TARGET_DTYPE, training=compute_dtype()))
    print(markdown_table(
        ["run", "training tokens", "epochs", "batch", "lr", "lm weight", "head decay",
         "held-out chain tau", "vLLM tau"],
        [[r["run"], f"{r['train_tokens']:,}", r["settings"]["epochs"],
          r["settings"]["batch_conversations"],
          r["settings"]["learning_rate"], r["settings"]["lm_weight"],
          r["settings"]["head_decay"], f"{r['heldout_chain_tau']:.3f}",
          "-" if r["vllm_tau"] is None else f"{r['vllm_tau']:.3f}"]
         for r in rows]))
    trend = extrapolate(rows, TAU_GOAL, RATIO_GOAL)
    fits = [*trend["vllm_tau"].items(), ("amphista / medusa", trend["amphista_over_medusa"])]
    for label, fit in fits:
        if fit is not None:
            reach = ("never" if fit["tokens_at_goal"] is None
                     else f"at ~{fit['tokens_at_goal']:,.0f} training tokens")
            print(f"{label}: +{fit['slope_per_e_fold']:.3f} per e-fold of data; "
                  f"{fit['goal']} {reach} if the trend held")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
