"""The training objective and the held-out metrics, over one alignment.

Per head k (0-based) at position t the draft predicts x_{t+2+k}. Its loss is
    alignment:  KL(target || draft), the target's distribution being lm_head(h_{t+1+k})
                restricted to the draft vocabulary,
  + lm_weight * cross-entropy against the actual token x_{t+2+k},
weighted by head_decay ** k (the loop's weights), at the positions whose drafts serving
uses: the last prompt position and the answer's (`Batch.drafted`); drafts at the other
prompt positions are never proposed, so they are neither computed nor taught. `HeadSpan`
writes the alignment once; the losses and `evaluate` both read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_amphista.eval.tau import tau
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.training.data import Conversation


@dataclass(frozen=True)
class HeadSpan:
    """Where head k's prediction, the target's view of it and its token sit: draft
    position t pairs with teacher t+1+k and token t+2+k."""

    k: int

    @property
    def teacher_offset(self) -> int:  # draft position t -> teacher position t + this
        return 1 + self.k

    @property
    def token_offset(self) -> int:  # draft position t -> the token it predicts
        return 2 + self.k


@dataclass
class Batch:
    hidden: torch.Tensor  # [B, T, d] right-padded
    tokens: torch.Tensor  # [B, T + 1]
    valid: torch.Tensor  # [B, T + 1] bool
    answer: torch.Tensor  # [B, T + 1] bool: answer tokens
    # (rows [N], positions [N]): where serving uses the drafts, and training teaches them
    drafted: tuple[torch.Tensor, torch.Tensor]
    target_logits: torch.Tensor  # [B, T, rows of lm_head]: lm_head(h_t), the view of x_{t+1}


def make_batch(conversations: list[Conversation], max_positions: int,
               lm_head: torch.Tensor) -> Batch:
    """The batch, on lm_head's device (the teacher's logits are computed there)."""
    device = lm_head.device
    length = min(max_positions, max(len(c.tokens) for c in conversations)) - 1
    b, d = len(conversations), conversations[0].hidden.shape[1]
    hidden = torch.zeros(b, length, d)
    tokens = torch.zeros(b, length + 1, dtype=torch.long)
    valid = torch.zeros(b, length + 1, dtype=torch.bool)
    answer = torch.zeros(b, length + 1, dtype=torch.bool)
    drafted = torch.zeros(b, length, dtype=torch.bool)
    for i, c in enumerate(conversations):
        n = min(len(c.tokens), length + 1)
        hidden[i, : n - 1] = c.hidden[: n - 1].float()
        tokens[i, :n] = c.tokens[:n]
        valid[i, :n] = True
        answer[i, c.prompt_len: n] = True
        drafted[i, _first_drafted(c): n - 2] = True  # head 0 needs x_{t+2}
    hidden = hidden.to(device)
    with torch.no_grad():
        target_logits = hidden @ lm_head.float().T
    rows, starts = drafted.nonzero(as_tuple=True)
    return Batch(hidden, tokens.to(device), valid.to(device), answer.to(device),
                 (rows.to(device), starts.to(device)), target_logits)


def _first_drafted(conversation: Conversation) -> int:
    """The first position serving drafts from: the last prompt token's."""
    return max(conversation.prompt_len - 1, 0)


def head_positions(conversations: list[Conversation], num_heads: int,
                   max_positions: int) -> torch.Tensor:
    """[K] how many drafted positions of these conversations each head is trained on."""
    lengths = torch.tensor([min(len(c.tokens), max_positions) for c in conversations])
    first = torch.tensor([_first_drafted(c) for c in conversations])
    return torch.stack([(lengths - 2 - k - first).clamp(min=0).sum()
                        for k in range(num_heads)])


def head_losses(logits: torch.Tensor, batch: Batch, to_draft: torch.Tensor,
                lm_weight: float, positions: torch.Tensor) -> torch.Tensor:
    """Per-head (alignment + lm_weight * CE) summed over the drafted positions and divided
    by `positions` [K] (the global batch's counts) -> tensor [K]. logits: [N, K, V'], the
    model's output at batch.drafted."""
    rows, starts = batch.drafted
    last = batch.hidden.shape[1]  # tokens run to T, teacher rows to T - 1
    teacher_probs = batch.target_logits.softmax(-1)
    losses = []
    for k in range(logits.shape[1]):
        span = HeadSpan(k)
        token_at = (starts + span.token_offset).clamp(max=last)
        kept = (starts + span.token_offset <= last) & batch.valid[rows, token_at]
        teacher = teacher_probs[rows, (starts + span.teacher_offset).clamp(max=last - 1)]
        label = to_draft[batch.tokens[rows, token_at]]  # -1 outside the draft vocab
        draft = logits[:, k].float().log_softmax(-1)
        alignment = -(teacher * draft).sum(-1)
        lm = -draft.gather(-1, label.clamp(min=0)[:, None]).squeeze(-1)
        per_position = alignment + lm_weight * lm * (label >= 0)
        losses.append((per_position * kept).sum() / positions[k].clamp(min=1))
    return torch.stack(losses)


@torch.no_grad()
def evaluate(model: AmphistaDraftModel, conversations: list[Conversation], lm_head: torch.Tensor,
             batch_conversations: int, max_positions: int) -> dict:
    """At the positions serving drafts from (Batch.drafted): per-head top-1 / top-5
    accuracy against the target's greedy token where that token is an answer token, and
    chain_tau: 1 + the mean number of leading heads whose top-1 is right over every
    drafted position; walk_tau: the same over the positions a greedy speculative loop
    drafts from (`walk`), i.e. the tokens per target step vLLM gets at temperature 0 on
    such answers. walk_tau is the lower: a loop drafts right after a rejected draft,
    where the heads are wrong more often than on average. lm_head must sit on the
    model's device."""
    model.eval()
    device = lm_head.device
    k_heads = model.config.num_heads
    hits1, hits5, total = (torch.zeros(k_heads, device=device) for _ in range(3))
    chain_accepted, chain_steps, walk_accepted, walk_steps = 0, 0, 0, 0
    for start in range(0, len(conversations), batch_conversations):
        batch = make_batch(conversations[start: start + batch_conversations], max_positions,
                           lm_head)
        rows, starts = batch.drafted
        logits = model(batch.hidden, batch.tokens[:, 1:], batch.drafted)  # [N, K, V']
        top5 = model.to_target_ids(logits.topk(5, dim=-1).indices)  # [N, K, 5]
        greedy = batch.target_logits.argmax(-1)  # the target's own choice of x_{t+1}
        last = batch.hidden.shape[1]
        right = torch.zeros(len(rows), k_heads, dtype=torch.bool, device=device)
        counted = torch.zeros_like(right)
        for k in range(k_heads):
            span = HeadSpan(k)
            token_at = (starts + span.token_offset).clamp(max=last)
            counted[:, k] = ((starts + span.token_offset <= last) & batch.valid[rows, token_at]
                             & batch.answer[rows, token_at])
            label = greedy[rows, (starts + span.teacher_offset).clamp(max=last - 1)]
            right[:, k] = (top5[:, k, 0] == label) & counted[:, k]
            hits1[k] += right[:, k].sum()
            hits5[k] += ((top5[:, k] == label[:, None]).any(-1) & counted[:, k]).sum()
            total[k] += counted[:, k].sum()
        leading = right.int().cumprod(-1).sum(-1)
        chain_accepted += int(leading[counted[:, 0]].sum())
        chain_steps += int(counted[:, 0].sum())
        for row in range(len(batch.hidden)):  # drafted positions are row-major, in order
            accepted, steps = walk(leading[rows == row].tolist())
            walk_accepted, walk_steps = walk_accepted + accepted, walk_steps + steps
    model.train()
    hits1, hits5, total = hits1.cpu(), hits5.cpu(), total.cpu()
    return {"top1": (hits1 / total.clamp(min=1)).tolist(),
            "top5": (hits5 / total.clamp(min=1)).tolist(), "positions": total.tolist(),
            "chain_tau": tau(chain_accepted, chain_steps),
            "walk_tau": tau(walk_accepted, walk_steps)}


def walk(leading: list[int]) -> tuple[int, int]:
    """A temperature-0 speculative loop over one answer: leading[i] is how many leading
    drafts are right when drafting from the i-th position; that step accepts them, and the
    next drafts from the bonus token's position, i + 1 + leading[i]. -> (accepted, steps)."""
    position = accepted = steps = 0
    while position < len(leading):
        accepted, steps = accepted + leading[position], steps + 1
        position += 1 + leading[position]
    return accepted, steps
