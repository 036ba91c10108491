"""How well the heads' confidence predicts what vLLM accepts, per draft position and band.

    python -m benchmarks.confidence_bands [--temperature 0.7] [--out results/confidence_bands.json]

One in-process engine, the prompts (default: MT-Bench first turns) in one batch at one
temperature (default 0), every draft verified (a step cost that makes verifying free).
Each verified draft's confidence (the running product of its heads' top probabilities,
the proposer's `confidence`) is paired with whether the target accepted it, as the
proposer's `AcceptanceTracker.record` sees them, and binned by confidence. This is the evidence for
learning the tracker's factor per band rather than one per position: which drafts get
verified depends on the load. JSON + table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from vllm_amphista.engine import start_llm
from vllm_amphista.eval.report import machine_line, markdown_table, write_report
from vllm_amphista.machine import TARGET_DTYPE, compute_dtype
from vllm_amphista.model.target import smollm2_dir
from vllm_amphista.paths import SHIPPED_HEADS
from vllm_amphista.prompts import first_turns
from vllm_amphista.serving import draft_length
from vllm_amphista.serving.draft_length import AcceptanceTracker, StepCost


def record_verified_drafts(sink: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Have every AcceptanceTracker in this process also append (confidence [n, K],
    accepted [n, K] as 0/1, NaN where not verified) to `sink`."""
    original = AcceptanceTracker.record

    def record(self, confidence, verified, accepted, sampled=None):
        position = np.arange(confidence.shape[1])
        outcome = (position < accepted[:, None]).astype(float)
        outcome[position >= verified[:, None]] = np.nan
        sink.append((confidence.copy(), outcome))
        original(self, confidence, verified, accepted, sampled)

    draft_length.AcceptanceTracker.record = record


def bands(confidence: np.ndarray, outcome: np.ndarray) -> list[dict]:
    """Per position and confidence band (the tracker's): drafts, mean confidence,
    accepted share."""
    count = AcceptanceTracker.BANDS
    rows = []
    for k in range(confidence.shape[1]):
        verified = ~np.isnan(outcome[:, k])
        c, ok = confidence[verified, k], outcome[verified, k]
        band = np.minimum((c * count).astype(int), count - 1)
        for b in np.unique(band):
            sel = band == b
            rows.append({"position": k + 1, "band": f"{b / count:.1f}-{(b + 1) / count:.1f}",
                         "drafts": int(sel.sum()), "confidence": float(c[sel].mean()),
                         "accepted": float(ok[sel].mean())})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(smollm2_dir()))
    parser.add_argument("--heads", default=str(SHIPPED_HEADS / "amphista"))
    parser.add_argument("--prompts", help="FastChat question.jsonl (default: MT-Bench)")
    parser.add_argument("--num-prompts", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="of every request (> 0: drafts sampled from q)")
    parser.add_argument("--out", default="results/confidence_bands.json")
    args = parser.parse_args(argv)
    from vllm import SamplingParams  # heavy: only where an engine starts

    sink: list[tuple[np.ndarray, np.ndarray]] = []
    record_verified_drafts(sink)
    with tempfile.TemporaryDirectory() as tmp:
        free = Path(tmp) / "verifying_is_free.json"
        StepCost.linear(fixed_ms=50.0, per_token_ms=0.0, draft_ms=0.0).save(free)
        llm = start_llm(args.target, speculative_config={
            "method": "amphista", "model": args.heads, "step_cost": str(free)})
        questions = first_turns(args.prompts, limit=args.num_prompts)
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
        llm.chat([[{"role": "user", "content": q}] for q in questions], params, use_tqdm=False)
    if not sink:
        raise SystemExit("no draft was verified: is the engine in this process "
                         "(VLLM_ENABLE_V1_MULTIPROCESSING=0)?")
    confidence = np.concatenate([c for c, _ in sink])
    outcome = np.concatenate([o for _, o in sink])
    rows = bands(confidence, outcome)
    write_report(args.out, {"heads": args.heads, "prompts": len(questions),
                            "temperature": args.temperature,
                            "max_tokens": args.max_tokens, "target_dtype": TARGET_DTYPE,
                            "draft_dtype": str(compute_dtype()).removeprefix("torch."),
                            "rows": rows})
    print(machine_line(target=TARGET_DTYPE, draft=compute_dtype()))
    print(markdown_table(["position", "confidence band", "drafts", "mean confidence",
                          "accepted"],
                         [[r["position"], r["band"], r["drafts"], f"{r['confidence']:.3f}",
                           f"{r['accepted']:.3f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
