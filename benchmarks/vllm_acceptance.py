"""tau and per-position acceptance of heads inside vLLM: `python -m
benchmarks.vllm_acceptance` (vllm_amphista/eval/acceptance.py has the method and flags)."""

from vllm_amphista.eval.acceptance import main

if __name__ == "__main__":
    raise SystemExit(main())
