"""What a training run leaves beside the heads: metrics.json, accuracy.png, MODEL_CARD.md."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path

from vllm_amphista.machine import cpu_label
from vllm_amphista.training.data import SHAREGPT_TURNS, Conversation
from vllm_amphista.training.settings import TrainSettings


def training_record(settings: TrainSettings, history: list[dict],
                    train_set: list[Conversation], eval_set: list[Conversation],
                    wall_s: float) -> dict:
    return {"settings": asdict(settings), "history": history,
            "train_conversations": len(train_set), "eval_conversations": len(eval_set),
            "train_tokens_per_epoch": sum(len(c.tokens) for c in train_set),
            "wall_s_this_run": wall_s}


def plot_accuracy(metrics: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = metrics["history"][-1]["eval"]
    heads = range(1, len(final["top1"]) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(heads, final["top1"], "o-", label="top-1")
    ax.plot(heads, final["top5"], "s--", label="top-5")
    ax.set_xlabel("head (predicts token t + 1 + k)")
    ax.set_ylabel("held-out accuracy vs the target's greedy token")
    ax.set_ylim(0, 1)
    ax.set_xticks(list(heads))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_metrics(metrics: dict, path: Path) -> None:
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def _machine(metrics: dict) -> str:
    machine = metrics.get("machine")
    if not machine:
        return "a 2-core CPU"
    return f"{cpu_label(machine)}, {machine['cores']} cores"


# What answered the prompts of heads trained before runs were recorded per data set.
GREEDY_ANSWERS = "answered by the target with vLLM at temperature 0"


def data_runs(metrics: dict) -> list[dict]:
    """The training runs behind a heads folder, oldest first: {"epochs", "prompts",
    "answers"} each (`train --init-from` may continue heads on other answers, or other
    prompts). Runs recorded before prompts were named all had ShareGPT's first turns."""
    epochs = metrics["settings"]["epochs"] + metrics.get("earlier_epochs", 0)
    runs = metrics.get("data_runs") or [{"epochs": epochs, "answers": GREEDY_ANSWERS}]
    return [{"prompts": SHAREGPT_TURNS["first"], **run} for run in runs]


def _prompts(run: dict) -> str:
    """A run's prompts, with their place in the list where a run records it."""
    if "prompt_range" not in run:
        return run["prompts"]
    start, end = run["prompt_range"]
    return f"{run['prompts']} (its prompts {start}-{end - 1})"


def _epochs(metrics: dict) -> str:
    *earlier_runs, this = data_runs(metrics)
    if not earlier_runs:
        return str(this["epochs"])
    earlier = sum(run["epochs"] for run in earlier_runs)
    if any(_prompts(run) != _prompts(this) for run in earlier_runs):
        data = "; then ".join(
            f"{prompts} " + ", then ".join(f"{run['answers']} ({run['epochs']} epoch(s))"
                                           for run in runs)
            for prompts, runs in itertools.groupby(earlier_runs, _prompts))
    elif all(run["answers"] == this["answers"] for run in earlier_runs):
        data = "the same data"
    else:
        data = "the same prompts " + ", then ".join(
            f"{run['answers']} ({run['epochs']} epoch(s))" for run in earlier_runs)
    return (f"{this['epochs']}, continuing heads trained {earlier} epoch(s) on {data} "
            f"(`--init-from`): {this['epochs'] + earlier} in all, each run on its own "
            "learning-rate schedule")


def _span(metrics: dict) -> str:
    return "for this run's epochs" if metrics.get("earlier_epochs") else "in all"


def write_model_card(metrics: dict, out_dir: Path) -> None:
    """MODEL_CARD.md beside the heads: data, budget, time, hyper-parameters, accuracy."""
    cfg, final = metrics["config"], metrics["history"][-1]["eval"]
    settings, this_run = metrics["settings"], data_runs(metrics)[-1]
    switches = ("Medusa-1 (no fusion, no SAL, no AEB)" if metrics["mode"] == "medusa" else
                f"Amphista: token fusion, {cfg['num_stages']} staged adaptation layers, "
                f"{cfg['num_aeb_layers']} auto-embedding layer(s)")
    rows = "\n".join(f"| {k + 1} | {a:.3f} | {b:.3f} |"
                     for k, (a, b) in enumerate(zip(final["top1"], final["top5"], strict=True)))
    card = f"""# {metrics['mode']} heads for {cfg['target_name']}

Trained by `vllm-amphista train` ({switches}); K = {cfg['num_heads']} heads, draft
vocabulary {cfg['draft_vocab_size'] or cfg['vocab_size']} tokens
(held-out answer coverage {metrics['draft_vocab_coverage_heldout'] or 1.0:.3f}),
{metrics['parameters']:,} parameters, stored in bf16. Target fingerprint
`{cfg['target_fingerprint']}`.

## Data and budget

- Self-distillation: {metrics['train_conversations'] + metrics['eval_conversations']}
  {_prompts(this_run)}, seed {settings['seed']},
  {this_run['answers']}; {metrics['eval_conversations']} conversations held
  out. {metrics['train_tokens_per_epoch']:,} tokens per epoch, epochs: {_epochs(metrics)}.
- Loss: KL to the target's next-token distribution + {settings['lm_weight']} x CE, head k
  weighted {settings['head_decay']}^k; AdamW, lr {settings['learning_rate']}, cosine,
  {settings['batch_conversations']} conversations per step, max {settings['max_positions']}
  positions.
- Wall time on {_machine(metrics)}: {metrics['total_seconds'] / 60:.1f} min {_span(metrics)} (data
  {metrics['data_seconds'] / 60:.1f} min of it: recording, or reading the shards an earlier
  `vllm-amphista data` or `train` left in the cache; training at
  {metrics.get('tokens_per_second') or 0:,.0f} tokens/s in {metrics.get('compute_dtype', '?')}).

## Held-out accuracy against the target's greedy token (answer positions)

On the {metrics['eval_conversations']} held-out conversations of this run's data
({_prompts(this_run)} {this_run['answers']}).

| head (predicts t+1+k) | top-1 | top-5 |
| --- | ---: | ---: |
{rows}

Held-out tau at temperature 0 with K = {cfg['num_heads']}: {final.get('walk_tau', float('nan')):.3f}
when a speculative loop walks each answer (it drafts after every bonus token, as vLLM does:
the number to expect from vLLM on such prompts), {final.get('chain_tau', float('nan')):.3f}
averaged over every answer position (1 + the mean number of leading heads whose top-1 is
right; higher, because a loop drafts right after a rejection, where heads miss more).

`metrics.json` has every number; `accuracy.png` plots the table.
"""
    (out_dir / "MODEL_CARD.md").write_text(card)
