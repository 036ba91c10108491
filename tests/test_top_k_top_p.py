"""The top-k / top-p cut from leading tokens equals vLLM's full-sort cut, and is what the
rejection sampler uses on CPU."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

from vllm_amphista.serving.top_k_top_p import CANDIDATES, cut_logits, leading_cut

V = 4096


def _rows(n: int, scale: float, seed: int) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def _vllm_kept(logits: torch.Tensor, k, p) -> torch.Tensor:
    return torch.isfinite(apply_top_k_top_p_pytorch(logits.clone(), k, p))


def _kept(logits: torch.Tensor, k, p) -> tuple[torch.Tensor, int]:
    ranked, order, kept = leading_cut(logits, k, p)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    return mask.scatter_(-1, order, kept), ranked.shape[-1]


def _tensor(values, dtype):
    return None if values is None else torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("case", [
    dict(k=[20, 5, 1, 50], width=51),  # top-k alone: the top max(k) + 1
    dict(k=[20, 5, 1, 50], p=[0.9, 0.5, 1.0, 0.3], width=51),  # top-p within top-k
    dict(p=[0.9, 0.5, 0.95, 0.8], width=CANDIDATES),  # peaked rows: the candidates hold p
    dict(p=[0.9, 0.5, 0.95, 0.8], scale=0.1, width=V),  # flat rows: they do not, full sort
    dict(k=[V, 30, V, 7], p=[0.9, 0.9, 0.5, 1.0], width=CANDIDATES),  # uncut by top-k: p
    dict(k=[300, 5, 1, 50], p=[0.9] * 4, width=301),  # top-k beyond the candidates
    dict(k=[V, 5, 1, 50], p=[1.0, 0.9, 0.9, 0.9], width=V),  # a row no cut touches
])
def test_leading_cut_keeps_what_vllm_keeps(case):
    k, p = _tensor(case.get("k"), torch.int64), _tensor(case.get("p"), torch.float32)
    for seed in range(5):
        logits = _rows(4, case.get("scale", 4.0), seed)
        kept, width = _kept(logits, k, p)
        assert torch.equal(kept, _vllm_kept(logits, k, p)), seed
        assert width == case["width"]  # the path the case is meant to take


def test_ties_at_the_kth_logit_are_all_kept():
    """vLLM keeps every token tied with the k-th largest logit; a tie running past the
    leading tokens sends the row to the full sort."""
    logits = torch.randint(0, 6, (6, V), generator=torch.Generator().manual_seed(0)).float()
    logits[:, :3] = torch.tensor([9.0, 8.0, 8.0])  # a tie at k=2 inside the leading tokens
    k, p = torch.tensor([2, 2, 3, 4, 1, 2]), torch.ones(6)
    kept, _ = _kept(logits, k, p)
    assert torch.equal(kept, _vllm_kept(logits, k, p))
    assert kept.sum(-1).tolist()[:3] == [3, 3, 3]
    assert kept.sum(-1).tolist()[3] > 4  # the 5s tie far beyond the leading tokens


def test_masked_tokens_stay_masked():
    logits = _rows(3, 4.0, 1)
    logits[:, ::2] = float("-inf")  # e.g. bad words, or min_tokens holding back EOS
    for k, p in ((torch.tensor([5, V, 40]), torch.tensor([0.9, 0.9, 0.2])),
                 (torch.tensor([V // 2 + 10] * 3), torch.tensor([0.9] * 3))):
        assert torch.equal(_kept(logits, k, p)[0], _vllm_kept(logits, k, p))


def test_cut_logits_leaves_uncut_rows_and_sorts_only_undecided_ones(monkeypatch):
    logits = _rows(6, 4.0, 2)
    logits[5] *= 0.02  # flat: its top-p mass lies beyond the candidates
    k = torch.tensor([V, 20, V, V, 3, V])
    p = torch.tensor([1.0, 0.9, 0.8, 1.0, 1.0, 0.9])
    theirs = apply_top_k_top_p_pytorch(logits.clone(), k, p)
    sorted_rows = []
    sort = torch.Tensor.sort

    def counting_sort(self, *args, **kwargs):
        sorted_rows.append(self.shape[0])
        return sort(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sort", counting_sort)
    ours = cut_logits(logits.clone(), k, p)
    assert sorted_rows == [1]  # the flat row, alone
    assert torch.equal(ours[[0, 3]], logits[[0, 3]])  # no cut: untouched
    cut = [1, 2, 4, 5]
    assert torch.equal(torch.isfinite(ours[cut]), torch.isfinite(theirs[cut]))
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=0, atol=1e-7)


def test_patched_rejection_sampler_cuts_top_p_rows_from_leading_tokens(monkeypatch):
    from types import SimpleNamespace

    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins
    from vllm.v1.sample import rejection_sampler

    load_general_plugins()
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()
    logits = _rows(3, 4.0, 3)
    tempered = logits / torch.tensor([[0.8], [0.8], [0.5]])
    expected = _vllm_kept(tempered, None, torch.tensor([0.9, 0.9, 0.5]))
    metadata = SimpleNamespace(all_greedy=False, temperature=torch.tensor([0.8, 0.5]),
                               top_k=None, top_p=torch.tensor([0.9, 0.5]))
    monkeypatch.setattr(torch.Tensor, "sort", None)  # a full sort would fail here
    got = rejection_sampler.apply_sampling_constraints(
        logits, torch.tensor([2, 3], dtype=torch.int32), metadata)
    assert torch.equal(torch.isfinite(got), expected)
