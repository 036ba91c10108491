"""The training loop: AdamW on the draft weights, the target frozen, resumable.

Data parallel (Ray Train workers, training/ray_launcher.py): when torch.distributed is
initialised, every rank walks the same global batches, takes its share of each, and the
model is wrapped in DDP. Per-head losses are divided by the whole global batch's position
counts, so N workers compute the one-worker gradient up to float rounding.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vllm_amphista.machine import resolve_dtype
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.training.data import Conversation
from vllm_amphista.training.objective import evaluate, head_losses, head_positions, make_batch
from vllm_amphista.training.report import training_record
from vllm_amphista.training.settings import STATE_FILE, TrainSettings


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
    draft_lm_head = model.lm_head_weight.float()
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
    tokens_seen, step_seconds = 0, 0.0  # this run's, optimizer steps only (no evaluation)
    with tqdm(total=total_steps, initial=step, desc="training", unit="step",
              disable=rank != 0) as bar:
        while step < total_steps:
            step_started = time.perf_counter()
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
            batch = make_batch(share, settings.max_positions, draft_lm_head)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = net(batch.hidden, batch.tokens[:, 1:], batch.drafted)
                losses = head_losses(logits, batch, to_draft, settings.lm_weight, positions)
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
            step_seconds += time.perf_counter() - step_started
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / step_seconds:.0f}")
            bar.update(1)
            if rank == 0 and (step % batches_per_epoch == 0 or step == total_steps):
                record = {"epoch": step / batches_per_epoch, "step": step,
                          "loss": loss.item(), "per_head_loss": losses.tolist(),
                          "eval": evaluate(model, eval_set, lm_head.to(device),
                                           settings.batch_conversations,
                                           settings.max_positions)}
                history.append(record)
                bar.write(f"epoch {record['epoch']:.0f}: held-out top-1 per head "
                          + " ".join(f"{a:.3f}" for a in record["eval"]["top1"]))
            if rank == 0 and (step % settings.checkpoint_every == 0 or step == total_steps):
                torch.save({"settings": asdict(settings), "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "step": step,
                            "history": history}, state_path)
    record = training_record(settings, history, train_set, eval_set,
                             time.perf_counter() - start_time)
    # Conversation tokens (prompt and answer, cut to max_positions) per second of steps.
    record["tokens_per_second"] = tokens_seen / step_seconds if step_seconds else None
    return record
