"""airtrace.eval.metrics on hand-computable cases and against scipy."""

import pytest
import torch
from scipy import stats

from airtrace.eval import SubsetPlan, metrics, sample_subsets

F64 = torch.float64


def test_ranks_average_ties():
    x = torch.tensor([[10.0], [20.0], [10.0], [5.0]])
    assert metrics.ranks(x)[:, 0].tolist() == [2.5, 4.0, 2.5, 1.0]


def test_group_scores_is_masks_times_scores():
    scores = torch.tensor([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]])  # (q=2, n=3)
    masks = torch.tensor([[True, True, False], [False, True, True]])
    assert metrics.group_scores(scores, masks).tolist() == [[3.0, -1.0], [6.0, 2.0]]


def _lds_case(outputs_of_groups):
    """One query, n = 3 examples with scores 1, 2, 4 and three subsets whose group scores are 3, 6, 5."""
    scores = torch.tensor([[1.0, 2.0, 4.0]])
    masks = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    return metrics.lds(scores, masks, torch.tensor(outputs_of_groups, dtype=F64).reshape(3, 1), bootstrap=50)


def test_lds_monotone_reversed_constant():
    assert _lds_case([0.1, 0.9, 0.5]).mean == pytest.approx(1.0)      # same order as 3, 6, 5
    assert _lds_case([0.9, -2.0, 0.0]).mean == pytest.approx(-1.0)    # reversed
    assert _lds_case([0.3, 0.3, 0.3]).mean == 0.0                     # constant outputs: undefined -> 0
    assert _lds_case([0.1, 0.5, 0.9]).mean == pytest.approx(0.5)      # ranks (1,3,2) vs (1,2,3): 1 - 6*2/24


def test_lds_averages_queries_and_matches_scipy():
    g = torch.Generator().manual_seed(0)
    q, n, m = 5, 40, 30
    scores = torch.randn(q, n, generator=g, dtype=F64)
    plan = sample_subsets(n, m, seed=3)
    outputs = plan.masks.to(F64) @ scores.T + 3.0 * torch.randn(m, q, generator=g, dtype=F64)
    outputs[:, 4] = 1.0  # one constant query counts as 0
    result = metrics.lds(scores, plan.masks, outputs, bootstrap=200, seed=1)
    predicted = (plan.masks.to(F64) @ scores.T).numpy()
    expected = [stats.spearmanr(predicted[:, i], outputs[:, i].numpy()).statistic for i in range(4)] + [0.0]
    assert result.per_query.tolist() == pytest.approx(expected, abs=1e-12)
    assert result.mean == pytest.approx(sum(expected) / 5, abs=1e-12)
    assert result.ci[0] <= result.mean <= result.ci[1]
    again = metrics.lds(scores, plan.masks, outputs, bootstrap=200, seed=1)
    assert again.ci == result.ci
    assert metrics.lds(scores, plan.masks, outputs, bootstrap=200, seed=2).ci != result.ci
    assert all(x != x for x in metrics.lds(scores, plan.masks, outputs, bootstrap=0).ci)


def test_bootstrap_ci_hand_cases():
    assert metrics.bootstrap_ci(torch.full((7,), 0.25), samples=100) == (0.25, 0.25)
    lo, hi = metrics.bootstrap_ci(torch.tensor([0.0, 1.0]), samples=2000, seed=0)
    assert (lo, hi) == (0.0, 1.0)  # means of two draws from {0, 1} are 0, 0.5 or 1 (1/4, 1/2, 1/4)
    lo, hi = metrics.bootstrap_ci(torch.tensor([0.0, 1.0]), samples=2000, seed=0, level=0.4)
    assert (lo, hi) == (0.5, 0.5)


def test_lds_shape_errors():
    with pytest.raises(ValueError, match="masks must be"):
        metrics.lds(torch.zeros(2, 5), torch.ones(3, 4, dtype=torch.bool), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"outputs must have shape \(3, 2\)"):
        metrics.lds(torch.zeros(2, 5), torch.ones(3, 5, dtype=torch.bool), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        metrics.lds(torch.zeros(2, 5), torch.ones(3, 5, dtype=torch.bool), torch.full((3, 2), float("nan")))


def test_loo_correlation():
    predicted = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    actual = torch.tensor([[2.0, 4.0, 6.0, 8.0], [1.0, 8.0, 27.0, 64.0]])
    result = metrics.loo_correlation(predicted, actual)
    pearson_cubic = stats.pearsonr([1, 2, 3, 4], [1, 8, 27, 64]).statistic
    assert result["spearman"] == pytest.approx(1.0)
    assert result["pearson"] == pytest.approx((1.0 + pearson_cubic) / 2)
    assert metrics.loo_correlation(predicted, -actual)["pearson"] == pytest.approx(-(1.0 + pearson_cubic) / 2)
    assert metrics.loo_correlation(predicted, torch.ones(2, 4)) == {"pearson": 0.0, "spearman": 0.0}


def test_mislabel_auc_hand_cases():
    flipped = torch.tensor([False, True, False, True])
    assert metrics.mislabel_auc(torch.tensor([0.1, 0.9, 0.2, 0.8]), flipped) == 1.0
    assert metrics.mislabel_auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), flipped) == 0.0
    # pairs (flipped, clean): (0.5,0.1) win, (0.5,0.7) loss, (0.3,0.1) win, (0.3,0.7) loss -> 2/4
    assert metrics.mislabel_auc(torch.tensor([0.1, 0.5, 0.7, 0.3]), flipped) == 0.5
    # one flipped example tied with one of two clean ones: (1 + 0.5) / 2
    assert metrics.mislabel_auc(torch.tensor([0.2, 0.5, 0.5]), torch.tensor([False, True, False])) == 0.75
    with pytest.raises(ValueError, match="some but not all"):
        metrics.mislabel_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="flipped must be"):
        metrics.mislabel_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 0]))


def test_mislabel_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).to(F64)  # many ties
    flipped = torch.rand(60, generator=g) < 0.3
    assert metrics.mislabel_auc(scores, flipped) == pytest.approx(roc_auc_score(flipped.numpy(), scores.numpy()))


def test_topk_removal_plan_and_effect():
    scores = torch.tensor([[5.0, 1.0, 4.0, 0.0, 2.0], [0.0, 3.0, 1.0, 2.0, -1.0]])
    plan = metrics.topk_removal_plan(scores, k=2, seed=0, train_seed=7)
    assert isinstance(plan, SubsetPlan) and plan.seeds == [7] * 4
    assert plan.masks[0].tolist() == [False, True, False, True, True]
    assert plan.masks[1].tolist() == [True, False, True, False, True]
    assert (~plan.masks[2:]).sum(dim=1).tolist() == [2, 2]
    assert metrics.topk_removal_plan(scores, k=2, seed=0).masks.equal(plan.masks)
    full = torch.tensor([1.0, 2.0], dtype=F64)
    outputs = torch.tensor([[0.2, 9.0], [9.0, 1.5], [0.9, 9.0], [9.0, 2.1]], dtype=F64)
    result = metrics.topk_removal(full, outputs)
    assert result.topk.tolist() == pytest.approx([0.8, 0.5])
    assert result.random.tolist() == pytest.approx([0.1, -0.1])
    assert result.mean_topk == pytest.approx(0.65) and result.mean_random == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="k must be smaller"):
        metrics.topk_removal_plan(scores, k=5)
