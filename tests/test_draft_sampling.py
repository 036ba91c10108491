"""Draft distributions q for sampled requests, and the proposer's use of them (no engine)."""

from __future__ import annotations

import pytest
import torch

from vllm_amphista.serving.draft_sampling import (
    DraftQ,
    RequestSampling,
    draft_distribution,
    sample_drafts,
)
from vllm_amphista.serving.top_k_top_p import CANDIDATES


def _sampling(temperature, top_k=None, top_p=None, generators=None) -> RequestSampling:
    return RequestSampling(
        temperature=torch.tensor(temperature, dtype=torch.float32),
        top_k=None if top_k is None else torch.tensor(top_k, dtype=torch.int32),
        top_p=None if top_p is None else torch.tensor(top_p, dtype=torch.float32),
        generators=generators or {})


def test_temperature_only_is_a_tempered_softmax():
    logits = torch.randn(2, 3, 50)
    q = draft_distribution(logits, _sampling([0.5, 2.0])).dense(50)
    torch.testing.assert_close(q[0], (logits[0] / 0.5).softmax(-1))
    torch.testing.assert_close(q[1], (logits[1] / 2.0).softmax(-1))


def test_top_k_and_top_p_keep_the_right_tokens():
    # One head, five tokens with probabilities 0.5, 0.25, 0.15, 0.07, 0.03 at T=1.
    p = torch.tensor([0.15, 0.5, 0.03, 0.25, 0.07])
    logits = p.log().expand(4, 1, 5).clone()
    q = draft_distribution(logits, _sampling([1.0] * 4, top_k=[2, 50, 50, 1],
                                             top_p=[1.0, 0.7, 0.8, 1.0])).dense(5)
    kept = (q > 0).squeeze(1)
    assert kept[0].tolist() == [False, True, False, True, False]  # top-2
    assert kept[1].tolist() == [False, True, False, True, False]  # 0.5 + 0.25 >= 0.7
    assert kept[2].tolist() == [True, True, False, True, False]  # 0.8 needs the third
    assert kept[3].tolist() == [False, True, False, False, False]  # top-1
    torch.testing.assert_close(q[0, 0, [1, 3]], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(q.sum(-1), torch.ones(4, 1))


def _full_sort_q(logits: torch.Tensor, sampling: RequestSampling) -> torch.Tensor:
    """The definition: vLLM's own cut (it sorts every row whole) at each row's temperature."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    n, k, v = logits.shape
    logits = (logits.float() / sampling.temperature[:, None, None]).reshape(n * k, v)
    top_k, top_p = (None if x is None else x.repeat_interleave(k)
                    for x in (sampling.top_k, sampling.top_p))
    return apply_top_k_top_p_pytorch(logits, top_k, top_p).softmax(-1).view(n, k, v)


@pytest.mark.parametrize("case", [
    dict(top_k=[20, 5, 1], width=21),  # the top max(k) + 1: a partial sort
    dict(top_k=[20, 300, 4096], width=4096),  # one row wider than the candidates: the full sort
    # peaked rows: the candidates hold the top-p mass
    dict(top_p=[0.9, 0.5, 0.95], width=CANDIDATES),
    dict(top_p=[0.9, 0.5, 0.95], flat=True, width=4096),  # flat rows: they do not, the full sort
    dict(top_k=[20, 4096, 300], top_p=[0.8, 0.9, 0.9], width=4096),  # top-p after a wide top-k
    # the candidates hold the uncut row's top-p mass
    dict(top_k=[40, 4096, 10], top_p=[0.8, 0.9, 0.5], width=CANDIDATES),
])
def test_partial_ranking_gives_the_full_sort_q(case):
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4096) * (0.1 if case.get("flat") else 4.0)
    sampling = _sampling([0.8, 1.0, 0.6], top_k=case.get("top_k"), top_p=case.get("top_p"))
    q = draft_distribution(logits, sampling)
    torch.testing.assert_close(q.dense(4096), _full_sort_q(logits, sampling),
                               atol=1e-6, rtol=1e-4)
    assert q.probs.shape[-1] == case["width"]  # the path the case is meant to take


def test_samples_follow_q_and_seeded_rows_repeat():
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0]]).expand(2, 2, 4).contiguous()
    q = DraftQ(probs, torch.tensor([3, 0, 2, 1]).expand(2, 2, 4))  # ids in another order
    counts = torch.zeros(4)
    for _ in range(50):
        ids = sample_drafts(DraftQ(q.probs.repeat(50, 1, 1), q.ids.repeat(50, 1, 1)), {})
        counts += torch.bincount(ids.flatten(), minlength=4)
    freq = counts / counts.sum()  # 10,000 draws: sd of each frequency < 0.005
    torch.testing.assert_close(freq, torch.tensor([0.3, 0.0, 0.1, 0.6]), atol=0.02, rtol=0)
    assert freq[1] == 0
    # A seeded row repeats whatever the global generator does; an unseeded one does not
    # (4 heads over 1000 equally likely tokens: a repeat by chance has odds of 1e-12).
    wide = DraftQ(torch.full((2, 4, 1000), 1e-3))
    torch.manual_seed(1)
    a = sample_drafts(wide, {1: torch.Generator().manual_seed(7)})
    torch.manual_seed(2)
    b = sample_drafts(wide, {1: torch.Generator().manual_seed(7)})
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])


def test_target_vocabulary_expansion():
    q = DraftQ(torch.tensor([[[0.7, 0.2, 0.1]]]), torch.tensor([[[2, 0, 1]]]))
    full = q.dense(12, draft_to_target=torch.tensor([9, 2, 5]))
    assert full.shape == (1, 1, 12)
    assert full[0, 0, [5, 9, 2]].tolist() == q.probs[0, 0].tolist()
    assert float(full.sum()) == 1.0 and int((full > 0).sum()) == 3
    # Without ids q covers the draft vocabulary in id order; without a map it is the target's.
    whole = DraftQ(torch.tensor([[[0.2, 0.1, 0.7]], [[0.5, 0.5, 0.0]]]))
    assert torch.equal(whole.dense(5, torch.tensor([4, 0, 3]))[:, 0], torch.tensor(
        [[0.1, 0.0, 0.0, 0.7, 0.2], [0.5, 0.0, 0.0, 0.0, 0.5]]))
    assert torch.equal(whole.dense(3), whole.probs)


def test_rows_renumber_generators():
    g = torch.Generator()
    sampling = _sampling([0.0, 0.7, 0.9], top_k=[5, 6, 7], generators={2: g})
    picked = sampling.rows([2, 1])
    assert picked.temperature.tolist() == [0.8999999761581421, 0.699999988079071]
    assert picked.top_k.tolist() == [7, 6] and picked.generators == {0: g}
    assert picked.is_greedy.tolist() == [False, False]
