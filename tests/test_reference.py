"""The reference decoder: chain and tree speculation equal plain greedy decoding."""

from __future__ import annotations

import pytest

from tests.conftest import draft_model
from vllm_amphista.model.checkpoint import save_checkpoint
from vllm_amphista.model.target import TargetWeights, export_smollm2
from vllm_amphista.prompts import first_turns
from vllm_amphista.reference.decoder import ReferenceDecoder, best_tree, chain
from vllm_amphista.reference.tree import build_tree

ACCEPTANCE = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.2, 0.1]]


def test_best_tree_is_greedy_by_path_probability():
    assert best_tree(ACCEPTANCE, 6) == [(0,), (0, 0), (1,), (0, 0, 0), (0, 1), (1, 0)]
    tree = best_tree(ACCEPTANCE, 40)
    assert len(tree) == 40 and len(set(tree)) == 40
    assert all(p[:-1] in tree or len(p) == 1 for p in tree)  # every parent present
    build_tree(tree, top_k=3)  # a valid tree
    assert best_tree([[0.9, 0.05], [0.9, 0.05]], 3) == [(0,), (0, 0), (1,)]


@pytest.mark.parametrize("kind", ["fresh", "random"])
def test_tiny_target_chain_and_tree_equal_plain(tiny_target_dir, tiny_target, kind):
    heads = draft_model(tiny_target, randomised=kind != "fresh")
    decoder = ReferenceDecoder(tiny_target_dir, heads)
    tree = build_tree(best_tree(ACCEPTANCE, 24), top_k=3)
    for prompt in ([5, 17, 30, 44, 9, 120, 33], [7, 8], list(range(40, 90))):
        plain = decoder.plain(prompt, 30)
        assert plain.tau == 1.0
        for spec in (decoder.speculative(prompt, 30, chain(4)),
                     decoder.speculative(prompt, 30, tree)):
            assert spec.tokens == plain.tokens
            assert sum(spec.accepted_per_step) >= len(plain.tokens) - 1  # may overshoot


def test_tree_kernel_path_matches(tiny_target_dir, tiny_target):
    """Verification through the Triton tree kernel (interpreted on CPU) decodes the same."""
    heads = draft_model(tiny_target, randomised=True)
    tree = build_tree(best_tree(ACCEPTANCE, 12), top_k=3)
    sdpa = ReferenceDecoder(tiny_target_dir, heads, tree_kernel=False)
    kernel = ReferenceDecoder(tiny_target_dir, heads, tree_kernel=True)
    prompt = [5, 17, 30, 44, 9, 120, 33]
    assert kernel.speculative(prompt, 12, tree).tokens == sdpa.speculative(prompt, 12, tree).tokens


@pytest.mark.slow
# Random heads on SmolLM2 add nothing the tiny target does not test, at a minute a run.
@pytest.mark.parametrize("kind", ["fresh"])
def test_smollm2_mt_bench_chain_and_tree_equal_plain(kind):
    target_dir = export_smollm2()
    target = TargetWeights.from_folder(target_dir)
    heads = draft_model(target, num_attention_heads=9, num_key_value_heads=3,
                        randomised=kind != "fresh")
    decoder = ReferenceDecoder(target_dir, heads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    tree = build_tree(best_tree([[0.5, 0.2, 0.1, 0.05]] * 4, 32), top_k=4)
    for question in first_turns(limit=2):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        plain = decoder.plain(prompt, 40, eos=tokenizer.eos_token_id)
        assert decoder.speculative(prompt, 40, chain(4), tokenizer.eos_token_id).tokens \
            == plain.tokens
        assert decoder.speculative(prompt, 40, tree, tokenizer.eos_token_id).tokens \
            == plain.tokens


def test_eval_tree_command(tiny_target_dir, tiny_target, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    heads = tmp_path / "heads"
    save_checkpoint(draft_model(tiny_target, randomised=True), heads)
    prompts = tmp_path / "questions.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "turns": [f"w{i} w{i + 1} a b"]})
                               + "\n" for i in range(3)))
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vllm-amphista"), "eval-tree", "--target",
         str(tiny_target_dir), "--heads", str(heads), "--prompts", str(prompts),
         "--num-prompts", "2", "--max-tokens", "10", "--tree-sizes", "6", "12", "--top-k", "3",
         "--calibration-prompts", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["rows"]] == ["plain", "chain", "tree-6", "tree-12"]
    assert all(r["lossless"] for r in report["rows"])
    assert "| heads | mode |" in proc.stdout
    assert len(report["rows"][1]["acceptance_by_rank"]) == 4
