"""The heads checkpoint format: bit-exact round trip and one clear error per bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import draft_model
from vllm_amphista.convert.medusa import export_vllm_medusa, import_medusa
from vllm_amphista.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vllm_amphista.model.target import TargetWeights


@pytest.fixture()
def saved(tiny_target, tmp_path):
    model = draft_model(tiny_target, draft_vocab_size=64, randomised=True)
    folder = tmp_path / "heads"
    save_checkpoint(model, folder)
    return model, folder


def test_round_trip_is_bit_exact(saved, tiny_target):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "amphista"
    assert config["architectures"] == ["AmphistaDraftModel"]
    assert config["target_fingerprint"] == tiny_target.fingerprint
    stored = load_file(str(folder / "model.safetensors"))
    assert not {"embed_tokens", "lm_head_weight"} & set(stored), "target weights leaked"
    loaded = load_checkpoint(folder, target=tiny_target)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    hidden = torch.randn(1, 6, tiny_target.hidden_size)
    tokens = torch.randint(0, tiny_target.vocab_size, (1, 6))
    assert torch.equal(model(hidden, tokens), loaded(hidden, tokens))


def _rewrite(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _other_target(target, **changes) -> TargetWeights:
    fields = dict(name="other-model", hidden_size=target.hidden_size,
                  vocab_size=target.vocab_size, embed_tokens=target.embed_tokens + 1.0,
                  lm_head=target.lm_head)
    fields.update(changes)
    return TargetWeights(**fields)


def test_missing_folder(tmp_path, tiny_target):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "nope", tiny_target)


def test_missing_config(saved, tiny_target):
    _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json"):
        load_checkpoint(folder, tiny_target)


def test_wrong_model_type(saved, tiny_target):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model_type"):
        load_checkpoint(folder, tiny_target)


def test_corrupt_safetensors(saved, tiny_target):
    _, folder = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors"):
        load_checkpoint(folder, tiny_target)


def test_missing_weights_file(saved, tiny_target):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing"):
        load_checkpoint(folder, tiny_target)


def test_missing_tensor_is_named(saved, tiny_target):
    _, folder = saved
    _rewrite(folder, lambda t: t.pop("heads.2.0.linear.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['heads.2.0.linear.weight'\]"):
        load_checkpoint(folder, tiny_target)


def test_unexpected_tensor_is_named(saved, tiny_target):
    _, folder = saved
    _rewrite(folder, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*extra.weight"):
        load_checkpoint(folder, tiny_target)


def test_wrong_shape_is_named(saved, tiny_target):
    _, folder = saved
    _rewrite(folder, lambda t: t.update({"fusion.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"fusion.weight has shape \[3, 3\]"):
        load_checkpoint(folder, tiny_target)


def test_non_finite_weights_are_named(saved, tiny_target):
    _, folder = saved

    def poison(t):
        t["final_norm.weight"][0] = float("nan")

    _rewrite(folder, poison)
    with pytest.raises(CheckpointError, match=r"final_norm.weight has non-finite"):
        load_checkpoint(folder, tiny_target)


def test_token_map_out_of_vocabulary(saved, tiny_target):
    _, folder = saved
    _rewrite(folder, lambda t: t["draft_to_target"].fill_(10_000))
    with pytest.raises(CheckpointError, match=r"draft_to_target"):
        load_checkpoint(folder, tiny_target)


def test_heads_for_another_target(saved, tiny_target):
    _, folder = saved
    with pytest.raises(CheckpointError, match=r"trained for target .* not for 'other-model'"):
        load_checkpoint(folder, _other_target(tiny_target))
    with pytest.raises(CheckpointError, match=r"hidden_size=128, target 'other-model' has hidden"):
        load_checkpoint(folder, _other_target(tiny_target, hidden_size=32))
    with pytest.raises(CheckpointError, match=r"vocab_size=512, target 'other-model' has vocab"):
        load_checkpoint(folder, _other_target(tiny_target, vocab_size=1000))


def test_config_with_unknown_field(saved, tiny_target):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hedas"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unknown fields.*num_hedas"):
        load_checkpoint(folder, tiny_target)


def test_fingerprint_ignores_dtype(tiny_target):
    assert _other_target(tiny_target, embed_tokens=tiny_target.embed_tokens.bfloat16()) \
        .fingerprint == TargetWeights(**{**tiny_target.__dict__, "name": "x"}).fingerprint


def _medusa_reference(weights, hidden, lm_head, num_heads, num_layers, block, head):
    out = []
    for h in range(num_heads):
        x = hidden
        for layer in range(num_layers):
            w = weights[block.format(h=h, l=layer, p="weight")]
            b = weights.get(block.format(h=h, l=layer, p="bias"), torch.zeros(w.shape[0]))
            x = x + torch.nn.functional.silu(x @ w.T + b)
        out.append(x @ (weights[head.format(h=h)] if head else lm_head).T)
    return torch.stack(out, dim=-2)


@pytest.mark.parametrize("layout", ["vllm", "vllm-shared-head", "fasterdecoding"])
def test_import_medusa(tmp_path, tiny_target, layout):
    d, v, heads, layers = tiny_target.hidden_size, tiny_target.vocab_size, 3, 2
    torch.manual_seed(0)
    if layout.startswith("vllm"):
        shared = layout == "vllm-shared-head"
        cfg = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": d,
               "vocab_size": v, "num_heads": heads, "num_hidden_layers": layers,
               "original_lm_head": shared}
        block, head = "blocks.{h}.layers.{l}.{p}", None if shared else "lm_heads.{h}.weight"
        weights = {block.format(h=h, l=layer, p="weight"): torch.randn(d, d) * 0.2
                   for h in range(heads) for layer in range(layers)}
    else:
        cfg = {"medusa_num_heads": heads, "medusa_num_layers": layers,
               "base_model_name_or_path": "tiny"}
        block, head = "{h}.{l}.linear.{p}", f"{{h}}.{layers}.weight"
        weights = {block.format(h=h, l=layer, p=p): torch.randn(*s) * 0.2
                   for h in range(heads) for layer in range(layers)
                   for p, s in (("weight", (d, d)), ("bias", (d,)))}
    if head:
        weights.update({head.format(h=h): torch.randn(v, d) * 0.2 for h in range(heads)})
    folder = tmp_path / layout
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "model.safetensors"))

    model = import_medusa(folder, tiny_target)
    assert model.config.is_medusa and model.config.num_heads == heads
    hidden = torch.randn(2, 5, d)
    want = _medusa_reference(weights, hidden, tiny_target.lm_head, heads, layers, block, head)
    got = model(hidden, torch.zeros(2, 5, dtype=torch.long))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # And it survives our own checkpoint format.
    save_checkpoint(model, tmp_path / "converted")
    again = load_checkpoint(tmp_path / "converted", tiny_target)
    drafted = again.extend(again.new_cache(), hidden[0], torch.zeros(5).long(), [5])
    torch.testing.assert_close(drafted, want[0, -1][None], rtol=1e-4, atol=1e-4)
    shutil.rmtree(folder)


@pytest.mark.parametrize("draft_vocab", [0, 64])
def test_export_vllm_medusa_round_trip(tmp_path, tiny_target, draft_vocab):
    """Our Medusa-mode heads in vLLM's MedusaModel layout: vLLM's formula (blocks with bias,
    the shared full lm_head) gives our logits on the draft vocabulary, and the importer
    reads the folder back."""
    model = draft_model(tiny_target, use_aeb=False, num_stages=0, use_token_fusion=False,
                        draft_vocab_size=draft_vocab, randomised=True)
    if draft_vocab:  # a scattered token map, not the identity prefix
        model.draft_to_target = torch.randperm(tiny_target.vocab_size)[:draft_vocab]
        model.refresh_lm_head(tiny_target.lm_head)
    save_checkpoint(model, tmp_path / "ours")
    out = export_vllm_medusa(tmp_path / "ours", tmp_path / "vllm", tiny_target)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["medusa_fc_bias"]
    weights = load_file(str(out / "model.safetensors"))
    hidden = torch.randn(2, 5, tiny_target.hidden_size)
    want = model(hidden, torch.zeros(2, 5, dtype=torch.long))
    vllm_formula = _medusa_reference(weights, hidden, weights["lm_heads.0.weight"], 4, 1,
                                     "blocks.{h}.layers.{l}.{p}", None)
    columns = model.to_target_ids(torch.arange(want.shape[-1]))
    torch.testing.assert_close(vllm_formula[..., columns], want, rtol=1e-5, atol=1e-5)
    again = import_medusa(out, tiny_target)
    torch.testing.assert_close(again(hidden, torch.zeros(2, 5, dtype=torch.long)),
                               vllm_formula, rtol=1e-5, atol=1e-5)


def test_export_vllm_medusa_refuses(tmp_path, saved, tiny_target):
    _, amphista_heads = saved
    with pytest.raises(CheckpointError, match="only Medusa-mode heads"):
        export_vllm_medusa(amphista_heads, tmp_path / "out", tiny_target)
    medusa = draft_model(tiny_target, use_aeb=False, num_stages=0,
                                use_token_fusion=False, randomised=True)
    save_checkpoint(medusa, tmp_path / "medusa")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        export_vllm_medusa(tmp_path / "medusa", tmp_path / "busy", tiny_target)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
