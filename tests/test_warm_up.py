"""serving/warm_up.py: which products the proposer warms at load, over which counts."""

from __future__ import annotations

import torch
from torch import nn

from vllm_amphista.kernels.packed_linear import PackedLinear
from vllm_amphista.serving.warm_up import WARMED_REQUESTS, warm_products, warm_token_counts


class FakeCpuLinear(nn.Module):
    """What vLLM 0.32.0's CPU dispatch leaves on a LinearBase: sizes, a freed weight and
    `cpu_linear`; records the rows it multiplies."""

    def __init__(self, out_features: int, in_features: int, calls: list) -> None:
        super().__init__()
        self.output_size_per_partition, self.input_size_per_partition = out_features, in_features
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = None
        self.cpu_linear = lambda x, weight, bias: calls.append((out_features, tuple(x.shape)))


class FakeVocabulary(nn.Module):
    """The vocabulary embedding keeps its weight, its sizes are the weight's."""

    def __init__(self, vocab: int, hidden: int, calls: list) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, hidden), requires_grad=False)
        self.cpu_linear = lambda x, weight, bias: calls.append((vocab, tuple(x.shape)))


def test_warm_token_counts_cover_drafting_steps_within_the_schedulers_limits():
    assert warm_token_counts(2, 256, 8192) == range(1, WARMED_REQUESTS * 3 + 1)
    assert warm_token_counts(3, 4, 8192) == range(1, 17)  # at most max_num_seqs requests
    assert warm_token_counts(4, 256, 32) == range(1, 33)  # at most the token budget


def test_every_distinct_weight_shape_runs_once_per_count(monkeypatch):
    calls, packed_rows = [], []
    target = nn.ModuleList([FakeCpuLinear(12, 8, calls), FakeCpuLinear(12, 8, calls),  # a twin
                            FakeCpuLinear(8, 12, calls), FakeVocabulary(20, 8, calls)])
    draft = nn.ModuleList([PackedLinear(torch.randn(6, 4)), PackedLinear(torch.randn(6, 4)),
                           PackedLinear(torch.randn(5, 6))])
    forward = PackedLinear.forward

    def recording(self, x):
        packed_rows.append((self.out_features, tuple(x.shape)))
        return forward(self, x)

    monkeypatch.setattr(PackedLinear, "forward", recording)
    warmed = warm_products(target, draft, range(1, 4), torch.float32, torch.float32)
    assert warmed == {"target": 3, "draft": 2}
    assert sorted(calls) == sorted((out, (m, k)) for out, k in ((12, 8), (8, 12), (20, 8))
                                   for m in (1, 2, 3))
    assert sorted(packed_rows) == sorted((out, (m, k)) for out, k in ((6, 4), (5, 6))
                                         for m in (1, 2, 3))
