"""The owners' latent-class model (calibration: share): hand-worked pieces, synthetic pools with
known owners at very unequal shares, and the streaming form against the in-memory one."""

from __future__ import annotations

import numpy as np
import pytest
import ray.data

from muki_ray.stages.combiner import fit_owner_model
from muki_ray.method.integrate import quantile_ranks
from muki_ray.config.labels import LabelSpace
from muki_ray.method.owners import (
    OwnerModel,
    _non_decreasing,
    cluster_histograms,
    fit_owners,
    owner_bins,
    owner_posteriors,
    row_keys,
    smallest_keys,
)


def test_bins_histograms_and_monotone_ratio_hand_worked():
    ranks = np.array([[0.05, 0.95], [0.55, 0.15], [0.99, 0.5]])
    assert owner_bins(ranks, 10).tolist() == [[0, 9], [5, 1], [9, 5]]
    h = cluster_histograms(np.array([0, 1, 1]), ranks, k=2, bins=10)
    assert h.shape == (2, 2, 10) and h[0, 0, 0] == 1 and h[0, 1, 9] == 1
    assert h[1, 0, 5] == 1 and h[1, 0, 9] == 1 and h[1, 1, 1] == 1 and h[1, 1, 5] == 1
    # PAVA: (1, 3, 2) with equal weights pools the violators 3, 2 into 2.5.
    np.testing.assert_allclose(_non_decreasing(np.array([1.0, 3.0, 2.0]), np.ones(3)), [1.0, 2.5, 2.5])


def test_posterior_hand_worked():
    """π = (0.2, 0.8); bin 1 of each teacher has log λ = log 4, bin 0 has 0. A text of cluster 0
    (Q = (1, 0)) in bins (1, 0): prior (0.95 + 0.05·0.2, 0.05·0.8) = (0.96, 0.04), times λ = (4, 1):
    (3.84, 0.04) / 3.88."""
    m = OwnerModel(np.array([0.2, 0.8]), np.log(np.array([[1.0, 4.0], [1.0, 4.0]])), np.array([[1.0, 0.0]]))
    post = m.posterior(np.array([0]), np.array([[0.9, 0.1]]))
    np.testing.assert_allclose(post, [[3.84 / 3.88, 0.04 / 3.88]])


def synthetic_pool(share: float, teachers: int, n: int = 3000, seed: int = 0):
    """Texts of 2 labels per teacher, each label a blob in a 16-d embedding; teacher 0 owns
    `share` of the pool, the others split the rest. Every teacher's score is its own offset (the
    over-confidence that makes raw scores incomparable) plus noise, plus 1 on its own texts."""
    rng = np.random.default_rng(seed)
    p = np.full(teachers, (1 - share) / (teachers - 1))
    p[0] = share
    owner = rng.choice(teachers, size=n, p=p)
    label = owner * 2 + rng.integers(0, 2, n)
    emb = rng.normal(0, 1, (teachers * 2, 16))[label] + rng.normal(0, 0.6, (n, 16))
    scores = rng.normal(0, 1, (n, teachers)) + rng.normal(0, 2, teachers)
    scores[np.arange(n), owner] += 1.0
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), scores, owner


@pytest.mark.parametrize("teachers", [2, 3])
@pytest.mark.parametrize("share", [0.03, 0.5, 0.97])
def test_owners_found_and_shares_estimated_at_any_share(share, teachers):
    emb, scores, owner = synthetic_pool(share, teachers)
    ranks = quantile_ranks(scores)
    post, model = owner_posteriors(emb, ranks, num_union=2 * teachers)
    true = np.bincount(owner, minlength=teachers) / len(owner)
    assert (post.argmax(1) == owner).mean() >= 0.9
    np.testing.assert_allclose(model.shares, true, atol=0.05)
    rank_acc = (ranks.argmax(1) == owner).mean()
    if share != 0.5:  # equal-share ranks hand a 3% (or 97%) teacher about half of the others' texts
        assert rank_acc < 0.9, rank_acc


def test_streaming_owner_model_equals_the_in_memory_one(ray_session):
    emb, scores, owner = synthetic_pool(0.05, 2, n=800, seed=3)
    ranks = quantile_ranks(scores)
    ids = [f"r{i}" for i in range(len(emb))]
    expected, model = owner_posteriors(emb, ranks, num_union=4, keys=row_keys(ids))
    ds = ray.data.from_items([{"id": i, "embedding": e.tolist(), "select_scores": r.tolist()}
                              for i, e, r in zip(ids, emb, ranks)]).repartition(5).materialize()
    assert ds.num_blocks() == 5
    space = LabelSpace.from_teachers({"a": ["x", "y"], "b": ["z", "w"]})
    streamed, centers = fit_owner_model(ds, space, iterations=20)
    np.testing.assert_allclose(streamed.shares, model.shares, atol=1e-9)
    got = streamed.posterior((emb @ centers.T).argmax(1), ranks)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_sample_of_smallest_keys_folds_over_blocks():
    keys = np.array([9, 3, 7, 1, 5], dtype=np.uint64)
    emb = np.arange(5, dtype=np.float64)[:, None]
    whole = smallest_keys(keys, emb, size=3)
    a, b = smallest_keys(keys[:2], emb[:2], size=3), smallest_keys(keys[2:], emb[2:], size=3)
    merged = smallest_keys(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]), size=3)
    assert whole[0].tolist() == merged[0].tolist() == [1, 3, 5]
    assert whole[1].ravel().tolist() == merged[1].ravel().tolist() == [3.0, 1.0, 4.0]


def test_fit_owners_with_one_teacher_or_no_rows_is_equal_shares():
    assert fit_owners(np.zeros((3, 1, 10))).shares.tolist() == [1.0]
    np.testing.assert_allclose(fit_owners(np.zeros((3, 2, 10))).shares, [0.5, 0.5])
