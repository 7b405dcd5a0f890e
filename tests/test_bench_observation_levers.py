"""benchmarks/bench_observation_levers.py and benchmarks/bench_latent_shift.py: the parts with known answers."""
import numpy as np
import pytest

from benchmarks import bench_latent_shift as shift
from benchmarks import bench_observation_levers as observation
from guided_diffusion.data.normalize import log_normalize


def test_library_variants_stay_within_each_label():
    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 30 + ["b"] * 20)
    latents = rng.normal(size=(50, 4)).astype(np.float32)
    library = np.arange(50, dtype=np.float32) + 1000
    variants = observation.library_variants(latents, labels, library, seed=3)
    assert np.array_equal(variants["own_library"], library)
    for name in ("shuffled_library", "neighbour_library"):
        for label in ("a", "b"):
            rows = labels == label
            assert set(variants[name][rows]) <= set(library[rows]), name  # drawn from the cell's own label
    for label in ("a", "b"):  # the shuffle is a permutation of the label's library sizes
        rows = labels == label
        assert sorted(variants["shuffled_library"][rows]) == sorted(library[rows])
    assert not np.array_equal(variants["shuffled_library"], library)
    assert (variants["neighbour_library"] != library).all()  # a neighbour, never the cell itself


def test_the_neighbour_library_comes_from_a_close_latent():
    labels = np.array(["a"] * 12)
    latents = np.repeat(np.arange(6, dtype=np.float32), 2)[:, None] * 10.0  # pairs of identical latents
    library = np.arange(12, dtype=np.float32)
    observation.NEIGHBOURS, saved = 1, observation.NEIGHBOURS
    try:
        variants = observation.library_variants(latents, labels, library, seed=0)
    finally:
        observation.NEIGHBOURS = saved
    assert np.array_equal(variants["neighbour_library"], library.reshape(6, 2)[:, ::-1].reshape(-1))


def test_the_donor_offset_is_the_weighted_mean_difference_over_the_other_types():
    means = {("alpha", "d1"): (np.array([1.0, 0.0]), 10), ("alpha", "d2"): (np.array([3.0, 0.0]), 20),
             ("gamma", "d1"): (np.array([0.0, 1.0]), 30), ("gamma", "d2"): (np.array([0.0, 2.0]), 30),
             ("beta", "d1"): (np.array([5.0, 5.0]), 40), ("delta", "d2"): (np.array([9.0, 9.0]), 40),
             ("tiny", "d1"): (np.array([0.0, 0.0]), 2), ("tiny", "d2"): (np.array([100.0, 100.0]), 2)}
    offset = shift.donor_offset(means, "beta", source="d1", target="d2")
    # alpha (weight 10): (2, 0); gamma (weight 30): (0, 1); beta is the type itself, delta has no d1 cells and
    # tiny too few cells
    np.testing.assert_allclose(offset, (np.array([2.0, 0.0]) * 10 + np.array([0.0, 1.0]) * 30) / 40)
    with pytest.raises(SystemExit, match="share no other type"):
        shift.donor_offset({("beta", "d1"): (np.zeros(2), 9)}, "beta", "d1", "d2")


def _shares(cells, genes, rng):
    profile = rng.gamma(0.6, 1.0, size=genes) + 0.05
    return np.tile(profile / profile.sum(), (cells, 1))


def test_counts_drawn_from_the_model_leave_no_residual_excess_and_a_planted_factor_is_found():
    rng = np.random.default_rng(0)
    cells, genes = 1500, 80
    share = _shares(cells, genes, rng)
    theta = np.full(genes, 5.0)
    library = rng.integers(3000, 6000, cells).astype(np.float64)
    columns = np.arange(genes)
    null = observation.draw_counts(share * library[:, None], theta, rng)
    _, excess = observation.residual_excess(null, share, theta, columns, rng)
    normalized = log_normalize(null)
    _, variance_null, _ = np.linalg.svd(normalized - normalized.mean(0), full_matrices=False)
    # the top components of a finite sample carry some noise by selection (their variance is biased upwards)
    assert excess[:10].sum() < 0.2 * (variance_null ** 2 / cells)[:10].sum()
    direction = np.zeros(genes)
    direction[:20] = 1.0 / np.sqrt(20)
    factor = rng.normal(size=cells) * 2.0  # log-mean moved along one direction, sd 2 / sqrt(20) per gene
    moved = share * np.exp(factor[:, None] * direction[None, :])
    moved /= moved.sum(axis=1, keepdims=True)
    planted = observation.draw_counts(moved * library[:, None], theta, rng)
    components, excess = observation.residual_excess(planted, share, theta, columns, rng)
    assert abs(components[0] @ direction) > 0.9
    assert excess[0] > 5 * excess[1]


def test_low_rank_shares_stay_shares_and_rank_zero_changes_nothing():
    rng = np.random.default_rng(1)
    share = _shares(50, 30, rng)
    genes = np.arange(10, 30)
    components = np.linalg.qr(rng.normal(size=(20, 20)))[0].T
    excess = np.linspace(1.0, 0.0, 20)
    moved = observation.low_rank_shares(share, genes, components, excess, rank=5, rng=rng)
    np.testing.assert_allclose(moved.sum(axis=1), 1.0)
    assert (moved >= 0).all() and not np.allclose(moved, share)
    np.testing.assert_allclose(observation.low_rank_shares(share, genes, components, excess, 0, rng), share)


def test_zero_inflation_fit_finds_a_planted_zero_probability():
    rng = np.random.default_rng(2)
    cells, genes = 3000, 6
    mean = np.full((cells, genes), 4.0)
    theta = np.full(genes, 3.0)
    planted = np.array([0.0, 0.0, 0.1, 0.1, 0.3, 0.3])
    counts = observation.draw_counts(mean / (1 - planted[None, :]), theta, rng, planted)
    pi, fitted = observation.zero_inflation_fit(counts, mean, theta)
    np.testing.assert_allclose(pi, planted, atol=0.051)
    assert (np.abs(np.log(fitted / theta)) < np.log(1.5)).all()


def test_matched_nonzero_counts_take_the_real_quantiles_and_keep_the_zeros_and_the_order():
    rng = np.random.default_rng(3)
    drawn = np.zeros((400, 3))
    drawn[:200, 0] = rng.integers(1, 4, 200)  # 200 detections, values 1-3
    real = np.zeros((400, 3))
    real[:100, 0] = np.repeat([1.0, 5.0], 50)  # half ones, half fives where detected
    drawn[:10, 1] = 2.0  # gene 1: never detected in the real cells, stays as drawn
    matched = observation.match_nonzero_counts(drawn, real, rng)
    assert np.array_equal(matched == 0, drawn == 0)
    values = matched[:200, 0]
    assert set(values) == {1.0, 5.0} and (values == 1.0).sum() == 100  # the real cells' shape, at the drawn rate
    # rank for rank: every drawn 3 sits at or above every drawn 1
    assert values[drawn[:200, 0] == 3].min() >= values[drawn[:200, 0] == 1].max()
    assert np.array_equal(matched[:, 1], drawn[:, 1]) and np.array_equal(matched[:, 2], drawn[:, 2])


def test_per_label_residuals_use_each_labels_own_factor_and_leave_small_labels_alone():
    rng = np.random.default_rng(4)
    genes = 60
    columns = np.arange(genes)
    theta = np.full(genes, 5.0)
    labels = np.array(["a"] * 800 + ["b"] * 800 + ["tiny"] * 10)
    share = _shares(len(labels), genes, rng)
    library = np.full(len(labels), 4000.0)
    directions = {"a": np.r_[np.ones(15), np.zeros(45)] / np.sqrt(15),
                  "b": np.r_[np.zeros(45), np.ones(15)] / np.sqrt(15)}
    moved = share.copy()
    for label, direction in directions.items():
        rows = labels == label
        moved[rows] *= np.exp(rng.normal(size=(rows.sum(), 1)) * 2.0 * direction[None, :])
    moved /= moved.sum(axis=1, keepdims=True)
    counts = observation.draw_counts(moved * library[:, None], theta, rng)
    result = observation.per_label_low_rank_shares(counts, share, theta, columns, labels, 1, 30, rng)
    np.testing.assert_allclose(result.sum(axis=1), 1.0)
    np.testing.assert_allclose(result[labels == "tiny"], share[labels == "tiny"])
    for label, direction in directions.items():  # the noise each label gets lies along its own planted factor
        log_change = np.log(result[labels == label]) - np.log(share[labels == label])
        log_change -= log_change.mean(axis=1, keepdims=True)
        _, _, top = np.linalg.svd(log_change - log_change.mean(0), full_matrices=False)
        assert abs(top[0] @ (direction - direction.mean()) / np.linalg.norm(direction - direction.mean())) > 0.9


def test_spread_scales_each_labels_distances_from_its_mean_and_one_changes_nothing():
    rng = np.random.default_rng(4)
    latents = rng.normal(size=(12, 3)).astype(np.float32)
    labels = np.array(["a"] * 5 + ["b"] * 7)
    assert np.allclose(observation.spread_latents(latents, labels, 1.0, on_sphere=False), latents, atol=1e-6)
    moved = observation.spread_latents(latents, labels, 2.0, on_sphere=False)
    for label in ("a", "b"):
        rows = labels == label
        centre = latents[rows].mean(axis=0)
        assert np.allclose(moved[rows].mean(axis=0), centre, atol=1e-5)
        assert np.allclose(moved[rows] - centre, 2.0 * (latents[rows] - centre), atol=1e-5)
    assert np.allclose(np.linalg.norm(observation.spread_latents(latents, labels, 2.0, on_sphere=True), axis=1), 1)
    share = rng.dirichlet(np.ones(6), size=12)
    assert np.allclose(observation.spread_shares(share, labels, 1.0), share)
    spread = observation.spread_shares(share, labels, 1.5)
    assert np.allclose(spread.sum(axis=1), 1)
    for label in ("a", "b"):  # log shares up to each cell's constant: the deviations from the label's mean x 1.5
        rows = labels == label
        assert np.allclose(_label_deviation(np.log(spread), rows), 1.5 * _label_deviation(np.log(share), rows))


def _label_deviation(log_share, rows):
    """The ``rows``' log shares centred per cell, minus their mean over the rows."""
    centred = log_share - log_share.mean(axis=1, keepdims=True)
    return centred[rows] - centred[rows].mean(axis=0)


def test_neighbour_shares_pool_the_other_cells_of_the_label_and_never_the_cell_itself():
    # two labels; within "a", pairs of identical latents far apart, so each cell's one neighbour is its twin
    latents = np.array([[0.0], [0.0], [100.0], [100.0], [0.0], [5.0]], dtype=np.float32)
    labels = np.array(["a", "a", "a", "a", "b", "c"])
    counts = np.array([[1, 3], [2, 2], [8, 0], [4, 4], [5, 5], [1, 1]], dtype=np.float64)
    share = np.full((6, 2), 0.5)
    pooled, corrected = observation.neighbour_shares(latents, labels, counts, share, neighbours=1)
    assert np.allclose(pooled[:4], [[0.5, 0.5], [0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])  # the twin's counts
    assert np.allclose(pooled[4:], share[4:]) and np.allclose(corrected[4:], share[4:])  # one-cell labels kept
    # corrected: the decoded share times (twin's counts + its decoded mean) / (2 x its decoded mean), renormalized
    ratio = (counts[[1, 0, 3, 2]] + 0.5 * counts[[1, 0, 3, 2]].sum(axis=1, keepdims=True)) / (
        counts[[1, 0, 3, 2]].sum(axis=1, keepdims=True))
    assert np.allclose(corrected[:4], ratio / ratio.sum(axis=1, keepdims=True))
    # with as many neighbours as the label has other cells, every cell pools the same three others
    pooled, _ = observation.neighbour_shares(latents, labels, counts, share, neighbours=10)
    for cell in range(4):
        others = [c for c in range(4) if c != cell]
        assert np.allclose(pooled[cell], counts[others].sum(axis=0) / counts[others].sum())
