"""vLLM itself on this machine: the in-process engine. (`vllm serve` runs plainly in
the bench test and with random heads in test_engine_amphista's bad-request test.)"""

from __future__ import annotations

import pytest

from tests.engine_helpers import run_engine_script

pytestmark = pytest.mark.engine


def test_llm_runs_tiny_target_greedy(tiny_target_dir):
    result = run_engine_script(f"""
from vllm import LLM, SamplingParams
from vllm_amphista.eval.report import print_result
llm = LLM(model={str(tiny_target_dir)!r}, enforce_eager=True, max_model_len=256, seed=0)
out = llm.generate(["w1 w2 w3 a b", "c d"], SamplingParams(temperature=0, max_tokens=8,
                                                          ignore_eos=True))
print_result([list(o.outputs[0].token_ids) for o in out])
""")
    assert [len(ids) for ids in result] == [8, 8]

