"""The heads ablation's data variants: sampled answers mixed in without leaking a
held-out prompt, at the budget each variant promises."""

from __future__ import annotations

import torch

from benchmarks.ablate_heads import Variant, training_set
from vllm_amphista.training.data import Conversation


def _conversation(prompt: int, answer: int) -> Conversation:
    tokens = torch.tensor([prompt, prompt + 1, answer])
    return Conversation(tokens, torch.zeros(2, 4), prompt_len=2)


def test_sampled_answers_replace_half_or_join_only_for_training_prompts():
    greedy = [_conversation(10 * i, 0) for i in range(8)]
    held_out_prompt = 10 * 8
    sampled = [_conversation(10 * i, 1) for i in range(9)]  # one more: a held-out twin
    assert training_set(Variant(), greedy, sampled, seed=0) == greedy

    half = training_set(Variant(answers="sampled", mix="half"), greedy, sampled, seed=0)
    answers = [int(c.tokens[-1]) for c in half]
    assert len(half) == len(greedy) and answers.count(1) == 4
    assert sorted(int(c.tokens[0]) for c in half) == [10 * i for i in range(8)]

    added = training_set(Variant(answers="sampled", mix="added"), greedy, sampled, seed=0)
    assert len(added) == 16 and added[:8] == greedy
    assert held_out_prompt not in [int(c.tokens[0]) for c in added + half]
