"""Draft distributions q for sampled requests, and the proposer's use of them (no engine)."""

from __future__ import annotations

import torch

from vllm_amphista.serving.draft_sampling import (
    RequestSampling,
    draft_distribution,
    sample_drafts,
    to_target_vocab,
)


def _sampling(temperature, top_k=None, top_p=None, generators=None) -> RequestSampling:
    return RequestSampling(
        temperature=torch.tensor(temperature, dtype=torch.float32),
        top_k=None if top_k is None else torch.tensor(top_k, dtype=torch.int32),
        top_p=None if top_p is None else torch.tensor(top_p, dtype=torch.float32),
        generators=generators or {})


def test_temperature_only_is_a_tempered_softmax():
    logits = torch.randn(2, 3, 50)
    q = draft_distribution(logits, _sampling([0.5, 2.0]))
    torch.testing.assert_close(q[0], (logits[0] / 0.5).softmax(-1))
    torch.testing.assert_close(q[1], (logits[1] / 2.0).softmax(-1))


def test_top_k_and_top_p_keep_the_right_tokens():
    # One head, five tokens with probabilities 0.5, 0.25, 0.15, 0.07, 0.03 at T=1.
    p = torch.tensor([0.15, 0.5, 0.03, 0.25, 0.07])
    logits = p.log().expand(4, 1, 5).clone()
    q = draft_distribution(logits, _sampling([1.0] * 4, top_k=[2, 50, 50, 1],
                                             top_p=[1.0, 0.7, 0.8, 1.0]))
    kept = (q > 0).squeeze(1)
    assert kept[0].tolist() == [False, True, False, True, False]  # top-2
    assert kept[1].tolist() == [False, True, False, True, False]  # 0.5 + 0.25 >= 0.7
    assert kept[2].tolist() == [True, True, False, True, False]  # 0.8 needs the third
    assert kept[3].tolist() == [False, True, False, False, False]  # top-1
    torch.testing.assert_close(q[0, 0, [1, 3]], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(q.sum(-1), torch.ones(4, 1))


def test_samples_follow_q_and_seeded_rows_repeat():
    q = torch.tensor([[0.6, 0.3, 0.1, 0.0]]).expand(2, 2, 4).contiguous()
    counts = torch.zeros(4)
    for _ in range(50):
        ids = sample_drafts(q.repeat(50, 1, 1), {})
        counts += torch.bincount(ids.flatten(), minlength=4)
    freq = counts / counts.sum()  # 10,000 draws: sd of each frequency < 0.005
    torch.testing.assert_close(freq, q[0, 0], atol=0.02, rtol=0)
    assert freq[3] == 0
    a = sample_drafts(q, {1: torch.Generator().manual_seed(7)})
    b = sample_drafts(q, {1: torch.Generator().manual_seed(7)})
    assert torch.equal(a[1], b[1])


def test_target_vocabulary_expansion():
    q = torch.tensor([[[0.7, 0.2, 0.1]]])
    full = to_target_vocab(q, torch.tensor([9, 2, 5]), 12)
    assert full.shape == (1, 1, 12)
    assert full[0, 0, [9, 2, 5]].tolist() == q[0, 0].tolist()
    assert float(full.sum()) == 1.0 and int((full > 0).sum()) == 3
    assert to_target_vocab(q, None, 3) is q


def test_rows_renumber_generators():
    g = torch.Generator()
    sampling = _sampling([0.0, 0.7, 0.9], top_k=[5, 6, 7], generators={2: g})
    picked = sampling.rows([2, 1])
    assert picked.temperature.tolist() == [0.8999999761581421, 0.699999988079071]
    assert picked.top_k.tolist() == [7, 6] and picked.generators == {0: g}
    assert picked.is_greedy.tolist() == [False, False]
