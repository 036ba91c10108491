"""Naming the heads: a folder, the shipped `amphista-heads`, a Hugging Face repo id; and
speculative configs that leave out "method"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from tests.conftest import draft_model
from tests.engine_helpers import run_engine_script
from vllm_amphista.model.checkpoint import save_checkpoint
from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.paths import SHIPPED_HEADS
from vllm_amphista.serving import heads_source
from vllm_amphista.serving.heads_source import (
    SHIPPED_NAME,
    HeadsNotFound,
    find_heads,
    names_amphista_heads,
)

SMOLLM2 = AmphistaConfig.load(SHIPPED_HEADS / "amphista")


def hub_snapshot(cache: Path, repo_id: str, heads: Path, commit: str, main: bool) -> Path:
    """Lay `heads` into a Hugging Face cache as the snapshot `commit` of `repo_id`, as
    `huggingface-cli download` leaves it; main=True makes it what `main` points at."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(heads, snapshot)
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_shipped_name_picks_the_heads_that_fit_the_target(tiny_target):
    for target in ("/models/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert find_heads(SHIPPED_NAME, target, SMOLLM2.hidden_size, SMOLLM2.vocab_size,
                          None) == SHIPPED_HEADS / "amphista"
    # Same shapes, another model: the recorded fingerprint tells them apart.
    other = TargetWeights(name="SmolLM2-135M-Instruct", hidden_size=SMOLLM2.hidden_size,
                          vocab_size=SMOLLM2.vocab_size,
                          embed_tokens=tiny_target.embed_tokens.new_ones(64, 576),
                          lm_head=tiny_target.lm_head)
    with pytest.raises(HeadsNotFound, match="no shipped heads fit"):
        find_heads(SHIPPED_NAME, "/m/SmolLM2-135M-Instruct", SMOLLM2.hidden_size,
                   SMOLLM2.vocab_size, other)


def test_shipped_heads_are_matched_on_their_config_not_their_folder(tmp_path, monkeypatch):
    shutil.copytree(SHIPPED_HEADS / "amphista", tmp_path / "any-name" / "amphista")
    monkeypatch.setattr(heads_source, "HEADS_DIR", tmp_path)
    assert find_heads(SHIPPED_NAME, "/m/SmolLM2-135M-Instruct", SMOLLM2.hidden_size,
                      SMOLLM2.vocab_size, None) == tmp_path / "any-name" / "amphista"


def test_no_fitting_heads_names_the_target_the_shipped_ones_and_the_train_command(
        tiny_target_dir, tiny_target):
    with pytest.raises(HeadsNotFound) as e:
        find_heads(SHIPPED_NAME, str(tiny_target_dir), tiny_target.hidden_size,
                   tiny_target.vocab_size, tiny_target)
    message = str(e.value)
    assert "\n" not in message
    assert f"target {tiny_target_dir} (hidden_size=128, vocab_size=512)" in message
    assert "SmolLM2-135M-Instruct (hidden_size=576, vocab_size=49152)" in message
    assert f"vllm-amphista train --target {tiny_target_dir}" in message


def test_a_local_folder_wins_over_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / SHIPPED_NAME).mkdir()
    (tmp_path / "owner" / "heads").mkdir(parents=True)
    for name in (SHIPPED_NAME, "owner/heads"):
        assert find_heads(name, "/m/SmolLM2-135M-Instruct", 576, 49152, None) == Path(name)


def test_unknown_name_is_refused_in_one_line():
    with pytest.raises(HeadsNotFound, match=r"heads 'no such heads' are not a folder, not "
                       r"'amphista-heads' \(the shipped heads\) and not a Hugging Face repo"):
        find_heads("no such heads", "/m/t", 576, 49152, None)


def test_hub_id_resolves_through_the_cache_with_a_pinned_revision(offline_hub):
    old = hub_snapshot(offline_hub, "owner/heads", SHIPPED_HEADS / "medusa", "a" * 40, False)
    new = hub_snapshot(offline_hub, "owner/heads", SHIPPED_HEADS / "amphista", "b" * 40, True)
    assert find_heads("owner/heads", "/m/t", 576, 49152, None) == new
    assert find_heads("owner/heads", "/m/t", 576, 49152, None, revision="a" * 40) == old
    assert names_amphista_heads("owner/heads")
    with pytest.raises(HeadsNotFound, match=r"'owner/other' are not in the Hugging Face "
                       r"cache .* HF_HUB_OFFLINE=1 forbids downloading"):
        find_heads("owner/other", "/m/t", 576, 49152, None)


def test_method_is_inferred_only_for_amphista_heads(tmp_path, offline_hub):
    assert names_amphista_heads(SHIPPED_NAME)
    assert names_amphista_heads(str(SHIPPED_HEADS / "medusa"))
    eagle = tmp_path / "eagle"
    eagle.mkdir()
    (eagle / "config.json").write_text(json.dumps({"model_type": "eagle"}))
    assert not names_amphista_heads(str(eagle))
    assert not names_amphista_heads("owner/not-cached")  # vLLM reports that one itself


@pytest.mark.engine
def test_heads_by_hub_id_without_method_through_llm_and_the_error_lines(
        tiny_target_dir, tiny_target, tmp_path):
    """LLM(...) with {"model": <Hub id>, "revision": ...} and no "method": the heads come
    from the offline Hub cache at the pinned revision and draft. Then every bad name is
    refused before an engine starts, with its one line."""
    cache = tmp_path / "hub"
    save_checkpoint(draft_model(tiny_target, randomised=True), tmp_path / "tiny-heads")
    pinned = hub_snapshot(cache, "tester/tiny-heads", tmp_path / "tiny-heads", "c" * 40, False)
    hub_snapshot(cache, "tester/tiny-heads", SHIPPED_HEADS / "amphista", "d" * 40, True)
    result = run_engine_script(f"""
from vllm import LLM, SamplingParams
from vllm_amphista.eval.report import print_result
target = {str(tiny_target_dir)!r}
errors = {{}}
for label, spec in [("unknown", {{"method": "amphista", "model": "no-such-heads"}}),
                    ("other target", {{"model": "amphista-heads"}}),
                    ("not cached", {{"method": "amphista", "model": "tester/missing"}})]:
    try:
        LLM(model=target, speculative_config=spec, enforce_eager=True, max_model_len=256)
        errors[label] = None
    except Exception as e:
        errors[label] = type(e).__name__ + ": " + str(e)
llm = LLM(model=target, enforce_eager=True, max_model_len=256, speculative_config={{
    "model": "tester/tiny-heads", "revision": {"c" * 40!r}}})
out = llm.generate(["w1 w2 w3"], SamplingParams(temperature=0, max_tokens=12))
heads = llm.llm_engine.vllm_config.additional_config["amphista"]["heads"]
print_result({{"errors": errors, "heads": heads,
              "tokens": len(out[0].outputs[0].token_ids)}})
""", env_extra={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert result["heads"] == str(pinned)
    assert result["tokens"] == 12
    errors = result["errors"]
    assert errors["unknown"].startswith("AmphistaSetupError: amphista: heads 'no-such-heads' "
                                        "are not a folder"), errors
    assert errors["other target"].startswith(
        f"AmphistaSetupError: amphista: no shipped heads fit target {tiny_target_dir}"), errors
    assert "'tester/missing' are not in the Hugging Face cache" in errors["not cached"], errors
