"""Engine scenarios run in a subprocess by the integration tests (see engine_helpers).

`python -m tests.engine_scenarios '<json spec>'` builds one LLM per entry of the spec's
speculative_configs (null: plain), one after the other, runs every listed scenario on
each, and hands back (report.print_result), per engine, the generated token ids,
spec-decode metrics, the proposer's cache state and the seconds each part took. Tests
compare plain and Amphista runs of the same spec.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from vllm_amphista.serving.draft_length import compiled_target

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def scenario_batch(llm, prompts, max_tokens):
    """All prompts at once, each with its own length limit (mixed lengths)."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens - 7 * (i % 4),
                             ignore_eos=True) for i in range(len(prompts))]
    return _ids(llm.generate(prompts, params, use_tqdm=False))


def scenario_uniform(llm, prompts, max_tokens):
    """All prompts at once, greedy, one length."""
    return _ids(llm.generate(prompts, _greedy(max_tokens), use_tqdm=False))


def scenario_single(llm, prompts, max_tokens):
    return _ids(llm.generate(prompts[:1], _greedy(max_tokens), use_tqdm=False))


def scenario_abort(llm, prompts, max_tokens):
    """Start every prompt, abort every other one after a few steps, finish the rest."""
    engine = llm.llm_engine
    ids = [f"abort-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, _greedy(max_tokens))
    finished: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 3:
            engine.abort_request(ids[::2])
    return [finished.get(rid) for rid in ids[1::2]]


def _sampled(llm, prompts, max_tokens, seed):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.8, top_p=0.95, n=2, seed=seed, max_tokens=max_tokens,
                            ignore_eos=True)
    outs = llm.generate(prompts[:3], params, use_tqdm=False)
    return [[len(c.token_ids) for c in o.outputs] for o in outs]


def scenario_sampled(llm, prompts, max_tokens):
    """Temperature > 0 with n > 1: must run and honour the lengths."""
    return _sampled(llm, prompts, max_tokens, seed=None)


def scenario_seeded(llm, prompts, max_tokens):
    """Per-request seeds. Not combined with chunked prefill: vLLM 0.32 CPU crashes on a
    seeded request whose prompt is chunked, with or without speculation (README, Limits)."""
    return _sampled(llm, prompts, max_tokens, seed=1234)


def scenario_mixed(llm, prompts, max_tokens):
    """Greedy requests batched with sampled ones, in two batches: top-k only (a batch whose
    only constraint is top-k takes its own path in vLLM's sampler), then top-p, top-k with
    top-p, a seed with n=2, and top-k again. Returns the greedy answers and every sampled
    answer's lengths. (vLLM 0.32 refuses min_p under any speculative method: the server
    test checks that refusal.)"""
    from vllm import SamplingParams

    batches = [[dict(temperature=0.8, top_k=20)],
               [dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_k=40, top_p=0.8),
                dict(temperature=0.8, seed=7, n=2), dict(temperature=0.9, top_k=5)]]
    greedy, lengths = [], []
    for sampled in batches:
        params = [SamplingParams(max_tokens=max_tokens, ignore_eos=True, **(
            {"temperature": 0.0} if i % 2 == 0 else sampled[i // 2 % len(sampled)]))
                  for i in range(len(prompts))]
        outs = llm.generate(prompts, params, use_tqdm=False)
        greedy += [list(o.outputs[0].token_ids) for o in outs[::2]]
        lengths += [[len(c.token_ids) for c in o.outputs] for o in outs[1::2]]
    return {"greedy": greedy, "sampled_lengths": lengths}


# The distribution test: many short samples of each prompt, reproducible through the
# engine's seed (LLM(seed=0)) rather than per-request seeds: vLLM 0.32 CPU crashes when a
# seeded request's sample is discarded ("CPU Generator does not use offset").
DISTRIBUTION_SAMPLES, DISTRIBUTION_TOKENS = 1000, 3


def scenario_distribution(llm, prompts, max_tokens):
    """DISTRIBUTION_SAMPLES samples of the first DISTRIBUTION_TOKENS tokens of each prompt
    at T=1.2, top-k 20, top-p 0.95."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.2, top_k=20, top_p=0.95,
                            max_tokens=DISTRIBUTION_TOKENS, ignore_eos=True)
    return [_ids(llm.generate([p] * DISTRIBUTION_SAMPLES, params, use_tqdm=False))
            for p in prompts]


SCENARIOS = {"single": scenario_single, "batch": scenario_batch, "uniform": scenario_uniform,
             "abort": scenario_abort, "sampled": scenario_sampled, "seeded": scenario_seeded,
             "mixed": scenario_mixed, "distribution": scenario_distribution}


def _metrics(llm) -> dict:
    wanted = {}
    for metric in llm.get_metrics():
        if metric.name.startswith(("vllm:spec_decode", "vllm:num_preemptions")):
            wanted[metric.name] = getattr(metric, "values", None) or getattr(metric, "value", 0)
    return wanted


def _drafter(llm):
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    return getattr(runner, "drafter", None)


def run(spec: dict, speculative_config: dict | None) -> dict:
    from vllm import LLM

    started = time.perf_counter()
    settings = {"enforce_eager": True, **spec.get("engine", {})}  # eager: starts in seconds
    llm = LLM(model=spec["target"], seed=0, dtype=spec.get("dtype", "float32"),
              max_model_len=spec.get("max_model_len", 2048), disable_log_stats=False,
              speculative_config=speculative_config, **settings)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
               for p in spec["prompts"]]
    seconds = {"engine start": time.perf_counter() - started}
    results = {}
    for name in spec["scenarios"]:
        started = time.perf_counter()
        results[name] = SCENARIOS[name](llm, prompts, spec["max_tokens"])
        seconds[name] = time.perf_counter() - started
    # One more (empty) step hands the last finished request ids to the worker.
    llm.llm_engine.step()
    drafter = _drafter(llm)
    return {"outputs": results, "metrics": _metrics(llm), "seconds": seconds,
            "cache": drafter.cache_stats() if hasattr(drafter, "cache_stats") else None,
            "warmed": getattr(drafter, "warmed_shapes", None),
            "compiled": compiled_target(llm.llm_engine.vllm_config)}


def main(spec: dict) -> list[dict]:
    """One engine per entry of spec["speculative_configs"] (null: plain), one after the
    other in this process: the engine import is paid once."""
    results = []
    for speculative_config in spec["speculative_configs"]:
        results.append(run(spec, speculative_config))
        gc.collect()  # the engine and its KV cache, before the next one
    return results


if __name__ == "__main__":
    from vllm_amphista.eval.report import print_result

    print_result(main(json.loads(sys.argv[1])))
    sys.exit(0)
