"""Recording the distillation set from vLLM (training/recorder.py, training/data.py)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.engine_helpers import run_engine_script
from vllm_amphista.training.data import RecordingPlan, prompt_plan, without_mt_bench


def test_mt_bench_questions_never_reach_the_training_prompts():
    question = "Compose an engaging travel blog post about a recent trip to Hawaii."
    prompts = ["How do I bake bread?", question, f"Please: {question.upper()}  Thanks",
               "Compose an engaging"]
    # The exact question, a prompt holding it, and a prompt held in it are all dropped.
    assert without_mt_bench(prompts, [question]) == ["How do I bake bread?"]


def test_an_answer_seed_names_its_own_answer_set_and_needs_sampling(tmp_path):
    plan = RecordingPlan(tmp_path, "tiny", ["a", "b", "c"], max_tokens=8, temperature=0.7,
                         shard_size=2)
    one, two = (dataclasses.replace(plan, answer_seed=s) for s in (1, 2))
    assert len({plan.folder, one.folder, two.folder}) == 3
    # Distinct seeds for every prompt of every set.
    seeds = [s for p in (one, two) for i in range(p.num_shards) for s in p.answer_seeds(i)]
    assert len(set(seeds)) == 6 and plan.answer_seeds(1) == [None]
    assert "answer seed 2" in two.answers
    with pytest.raises(ValueError, match="temperature > 0"):
        dataclasses.replace(plan, temperature=0.0, answer_seed=1)


def test_a_slice_of_the_prompts_shares_the_shards_of_the_whole_list(tiny_target_dir):
    prompts = [f"prompt {i}" for i in range(7)]
    whole = prompt_plan(tiny_target_dir, prompts, 6, 8, temperature=0.7, shard_size=2,
                        answer_seed=1)
    tail = prompt_plan(tiny_target_dir, prompts, 6, 8, temperature=0.7, shard_size=2,
                       answer_seed=1, first_prompt=4)
    # Prompts 4-6 of the list: their shards are the whole list's from the third on, with
    # the same answer seeds, so the longer run reuses what the slice recorded.
    assert tail.prompts == prompts[4:] and tail.prompt_range == [4, 7]
    assert tail.shard_path(0) == whole.shard_path(2)
    assert tail.answer_seeds(0) == whole.answer_seeds(2)
    with pytest.raises(ValueError, match="must start a shard"):
        prompt_plan(tiny_target_dir, prompts, 6, 8, shard_size=2, first_prompt=3)
    with pytest.raises(ValueError, match="past the end of the 7 prompts from a file"):
        prompt_plan(tiny_target_dir, prompts, 6, 8, shard_size=2, first_prompt=8)


@pytest.mark.engine
def test_recorded_rows_are_the_targets_hidden_states_and_shards_resume(tiny_target_dir,
                                                                       tmp_path):
    """Three prompts, shards of two, chunked prefill (16 tokens a step): every recorded
    conversation's rows equal transformers' final hidden states on it; deleting a shard
    and building again re-records that shard only. Given replies (ShareGPT's own) are
    read, not answered: the conversation is the prompt and that reply, no sampled token,
    its answer starting where the prompt alone ends; a prompt without a reply is left
    out; they land in another folder. Sampled answers with an answer seed are the same
    when recorded again and others under another seed, each set in its own folder."""
    result = run_engine_script(f"""
import dataclasses, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_amphista.eval.report import print_result
from vllm_amphista.paths import DATA_DIR
from vllm_amphista.training.data import RecordingPlan, _read_reply, record_dataset
target = Path({str(tiny_target_dir)!r})
plan = RecordingPlan(target, "tiny", ["w1 w2 w3 a b c", "c d " * 20, "w7 w8"], max_tokens=12,
                     shard_size=2)
convs = record_dataset(plan, max_num_seqs=8, max_model_len=512, max_num_batched_tokens=16)
hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
read_plan = dataclasses.replace(plan, replies=["w4 w5 w6 " * 3, None, "a b c " * 30])
read = record_dataset(read_plan, max_num_seqs=8, max_model_len=512, max_num_batched_tokens=16)
tokenizer = AutoTokenizer.from_pretrained(target)
expected = [_read_reply(tokenizer, p, r) for p, r in zip(plan.prompts, read_plan.replies)]
expected = [e for e in expected if e is not None]
diffs = []
for c in convs + read:
    with torch.no_grad():
        ref = hf(c.tokens[None], output_hidden_states=True).hidden_states[-1][0]
    diffs.append(float((c.hidden.float() - ref[: len(c.hidden)]).abs().max()))
first = plan.shard_path(0).stat().st_mtime_ns
plan.shard_path(1).unlink()
again = record_dataset(plan, max_num_seqs=8, max_model_len=512, max_num_batched_tokens=16)
sampled = {{}}
for seed in (1, 2, 1):
    seeded = dataclasses.replace(plan, temperature=1.0, answer_seed=seed)
    for path in seeded.shard_paths():
        path.unlink(missing_ok=True)
    sampled.setdefault(seed, []).append(
        [c.tokens.tolist() for c in record_dataset(seeded, max_num_seqs=8, max_model_len=512)])
    sampled.setdefault("folders", set()).add(str(seeded.folder))
print_result({{
    "rows": [[len(c.tokens), len(c.hidden), c.prompt_len] for c in convs],
    "diffs": diffs, "under_cache": str(plan.folder).startswith(str(DATA_DIR)),
    "shard0_kept": plan.shard_path(0).stat().st_mtime_ns == first,
    "same_tokens": [c.tokens.tolist() for c in again] == [c.tokens.tolist() for c in convs],
    "read": [[c.tokens.tolist(), len(c.hidden), c.prompt_len] for c in read],
    "expected_read": expected, "read_folder_differs": read_plan.folder != plan.folder,
    "seed1": sampled[1], "seed2": sampled[2], "sampled_folders": len(sampled["folders"])}})
""", env_extra={"VLLM_AMPHISTA_CACHE": str(tmp_path / "cache")})
    assert len(result["rows"]) == 3
    for tokens, hidden, prompt_len in result["rows"]:
        assert hidden == tokens - 1 and 0 < prompt_len < tokens
    assert max(result["diffs"]) < 2e-2  # rows stored in bf16
    assert result["under_cache"] and result["shard0_kept"] and result["same_tokens"]
    assert len(result["read"]) == 2 and result["read_folder_differs"]
    first, again = result["seed1"]
    assert first == again and result["seed2"][0] != first
    assert result["sampled_folders"] == 2
    for (tokens, hidden, prompt_len), (ids, start) in zip(
            sorted(result["read"]), sorted(result["expected_read"]), strict=True):
        assert tokens == ids and prompt_len == start and hidden == len(tokens) - 1
