"""How much the heads' drafts owe to the SAL cache's context.

    python -m benchmarks.sal_context [--heads H] [--conversations 60]
                                     [--windows 1 2 4 8 16 32] [--prompt-tails 16 32 64 128]
                                     [--out results/sal_context.json]

A request whose draft pass paused has no SAL cache when drafting resumes: its cache
restarts from the step it resumes at. This measures what that costs: per-head top-1
accuracy against the target's greedy token, and the chain tau (1 + the mean number of
leading heads right), when the cache holds only the last W positions, against the whole
conversation before them; and when a request's cache starts at the last N positions of
its prompt and then keeps every answer position (what the proposer feeds the SAL layers
of a long prompt, serving/proposer.py). Data: ShareGPT later turns 4096-4351 answered
at T=0.7 (answer seed 0), prompts the shipped heads never saw (their later-turn run
read 0-4095), recorded by vLLM as `vllm-amphista data --turns later --first-prompt 4096
--num-prompts 256 --temperature 0.7 --answer-seed 0` records them (here, if not cached).
Every context is scored at the same answer positions: those with at least max(windows)
positions before.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from vllm_amphista.eval.report import machine_line, markdown_table, write_report
from vllm_amphista.eval.tau import tau
from vllm_amphista.machine import resolve_dtype
from vllm_amphista.model.checkpoint import load_checkpoint
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.paths import SHIPPED_HEADS
from vllm_amphista.serving.draft_length import confidence
from vllm_amphista.training.data import Conversation, record_dataset, sharegpt_plan


@torch.no_grad()
def heads_right(model, conversation: Conversation, lm_head: torch.Tensor,
                window: int | None, first: int, prompt_tail: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] bool twice: whether head k's top-1 is the target's greedy token, drafting
    from each answer position t >= first with the cache holding the last `window`
    positions up to t, or (prompt_tail) every position from the prompt's last
    `prompt_tail` on, or (neither) all of them; and whether that token is in the
    conversation. Then [N, K] the heads' confidence there (`confidence`: what the
    proposer prices drafts by)."""
    hidden, tokens = conversation.hidden.float(), conversation.tokens
    length, k_heads = hidden.shape[0], model.config.num_heads
    greedy = (hidden @ lm_head.T).argmax(-1)  # greedy[t]: the target's choice of x_{t+1}
    # Position t reads h_t and x_{t+1}; head k predicts x_{t+2+k}, scored while in range.
    positions = torch.arange(max(first, conversation.prompt_len - 1), length - 1)
    if window is None:
        start = max(0, conversation.prompt_len - (prompt_tail or conversation.prompt_len))
        logits = model(hidden[None, start:], tokens[None, start + 1: length + 1])[
            0, positions - start]
    else:
        index = positions[:, None] - window + 1 + torch.arange(window)
        logits = model(hidden[index], tokens[index + 1])[:, -1]
    drafts = model.to_target_ids(logits.argmax(-1))  # [N, K]
    predicted_at = positions[:, None] + 1 + torch.arange(k_heads)  # the greedy[] index
    in_range = predicted_at < length
    right = (drafts == greedy[predicted_at.clamp(max=length - 1)]) & in_range
    return right, in_range, torch.from_numpy(confidence(logits))


def _context(row: dict) -> str:
    if row["window"]:
        return str(row["window"])
    if row["prompt_tail"]:
        return f"prompt's last {row['prompt_tail']}, then all"
    return "all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=Path, default=SHIPPED_HEADS / "amphista")
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--prompt-tails", type=int, nargs="*", default=[16, 32, 64, 128])
    parser.add_argument("--out", type=Path, default=Path("results/sal_context.json"))
    args = parser.parse_args()
    target_dir = export_smollm2()
    plan = sharegpt_plan(target_dir, 256, 256, temperature=0.7, dtype=resolve_dtype(None),
                         answer_seed=0, turns="later", first_prompt=4096)
    conversations = record_dataset(plan)[: args.conversations]
    target = TargetWeights.from_folder(target_dir)
    model = load_checkpoint(args.heads, target=target, dtype=torch.float32).eval()
    lm_head = target.lm_head.float()
    first = max(args.windows) - 1
    rows = []
    contexts = [*((w, None) for w in args.windows), *((None, n) for n in args.prompt_tails),
                (None, None)]
    for window, prompt_tail in contexts:
        right, counted, confident = map(torch.cat, zip(
            *(heads_right(model, c, lm_head, window, first, prompt_tail)
              for c in conversations), strict=True))
        leading = right.int().cumprod(-1).sum(-1)
        rows.append({"window": window, "prompt_tail": prompt_tail,
                     "top1": (right.sum(0) / counted.sum(0)).tolist(),
                     "chain_tau": tau(int(leading.sum()), len(leading)),
                     "first_confidence": float(confident[:, 0].mean()),
                     "positions": len(leading)})
    quartiles = statistics.quantiles([c.prompt_len for c in conversations], n=4)
    write_report(args.out, {"heads": str(args.heads), "data": plan.prompt_source,
                            "prompt_range": plan.prompt_range,
                            "conversations": len(conversations),
                            "prompt_len_quartiles": quartiles, "rows": rows})
    print(machine_line(draft="float32"))
    print(markdown_table(
        ["cached positions", *[f"head {k + 1} top-1" for k in range(len(rows[0]["top1"]))],
         "chain tau", "head 1 confidence"],
        [[_context(r), *[f"{a:.3f}" for a in r["top1"]], f"{r['chain_tau']:.3f}",
          f"{r['first_confidence']:.3f}"] for r in rows]))
    print(f"{rows[0]['positions']} answer positions; prompt lengths' quartiles "
          f"{[round(q) for q in quartiles]}; wrote {args.out}")


if __name__ == "__main__":
    main()
