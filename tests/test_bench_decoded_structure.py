"""benchmarks/bench_decoded_structure.py: the count-shape table and the within-type variance ratios, known answers."""
import numpy as np
import scipy.sparse as sp

from benchmarks import bench_decoded_structure as structure


def test_gene_count_shape_counts_detections_and_single_counts():
    counts = np.array([[0, 1, 3], [2, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)
    detected, ones, mean = structure.gene_count_shape(sp.csr_matrix(counts))
    assert detected.tolist() == [2, 2, 2] and ones.tolist() == [1, 2, 1]
    np.testing.assert_allclose(mean, [0.75, 0.5, 1.0])


def test_count_shape_rows_bin_genes_by_their_fitting_mean():
    rng = np.random.default_rng(0)
    fit = rng.poisson(np.r_[np.full(5, 0.005), np.full(5, 2.0)], size=(4000, 10)).astype(float)
    bursty = fit.copy()
    bursty[bursty > 0] *= 2  # the same detections, no single counts
    rows = structure.count_shape_rows(fit, fit, [bursty, bursty])
    assert [r[1] for r in rows] == [5, 5]  # two bins: the rare genes and the common ones
    (low_bin, _, p_fit, p_val, p_made, d_val, d_made), common = rows
    assert low_bin == (0.0, 0.01) and p_fit == p_val and p_fit > 0.95 and p_made == 0.0
    assert d_val == d_made  # detection untouched
    # Poisson(2): P(1) / P(>0) = 2 e^-2 / (1 - e^-2)
    assert abs(common[2] - 2 * np.exp(-2) / (1 - np.exp(-2))) < 0.02


def test_variance_ratios_are_one_for_the_same_cells_and_the_square_of_a_shrinkage():
    rng = np.random.default_rng(1)
    loadings = rng.normal(size=(4, 50))
    def cells(n):
        return rng.normal(size=(n, 4)) * [3.0, 2.0, 1.5, 1.0] @ loadings + rng.normal(size=(n, 50)) * 0.3
    fit, validation = cells(500), cells(400)
    np.testing.assert_allclose(structure.variance_ratios(fit, validation, validation, 4), 1.0)
    centre = validation.mean(axis=0)
    shrunk = centre + 0.5 * (validation - centre)
    np.testing.assert_allclose(structure.variance_ratios(fit, validation, shrunk, 4), 0.25, rtol=1e-6)
