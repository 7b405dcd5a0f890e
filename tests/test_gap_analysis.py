"""exp_script/gap_analysis.py: its measurements on arrays with known answers, and the CLI end to end on a
tiny trained pipeline."""
import json

import numpy as np
import pytest

import cell_sample
import cell_train
from exp_script import gap_analysis
from exp_script.evaluation import features, metrics
from exp_script import split
from synthetic import make_counts_adata
from VAE import VAE_train


def gaussian_sets(shift_label=None, shift=0.0, n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b"], n // 2)
    reference = rng.normal(size=(n, 5))
    compared = rng.normal(size=(n, 5))
    if shift_label is not None:
        compared[labels == shift_label] += shift
    return reference, labels, compared, labels.copy()


def test_two_sample_is_chance_for_one_distribution_and_high_for_a_shift():
    same = metrics.two_sample(*gaussian_sets(), use_rf=False)["overall"]
    shifted = metrics.two_sample(*gaussian_sets("a", 3.0), use_rf=True)["overall"]
    assert 0.35 < same["knn_auc"] < 0.65
    assert shifted["knn_auc"] > 0.7 and shifted["rf_auc"] > 0.7


def test_per_label_auc_finds_the_one_shifted_label():
    result = metrics.two_sample(*gaussian_sets("b", 4.0), use_rf=False)["per_label"]
    assert result["b"]["knn_auc"] > 0.95
    assert 0.3 < result["a"]["knn_auc"] < 0.7
    assert result["a"]["n_reference"] == result["a"]["n_compared"] == 100


def test_balanced_rows_cut_the_larger_side_keeping_label_shares():
    reference_labels = np.array(["a"] * 30 + ["b"] * 10)
    compared_labels = np.array(["a"] * 300 + ["b"] * 100)
    reference_rows, compared_rows = features.balanced_rows(reference_labels, compared_labels, np.random.default_rng(0))
    assert len(reference_rows) == len(compared_rows) == 40
    assert (compared_labels[compared_rows] == "b").sum() == 10


def test_expression_auc_does_not_grow_with_the_size_of_the_larger_side():
    # compared cells carry extra variance along five directions of gene space; a feature space fitted mostly
    # on the compared side would find those directions first and separate better the larger that side is
    rng = np.random.default_rng(0)
    n_genes = 300
    genes = np.array([f"g{i}" for i in range(n_genes)])
    directions = np.linalg.qr(np.random.default_rng(1).normal(size=(n_genes, 5)))[0]

    def cells(n, extra):
        return (3 + rng.normal(size=(n, n_genes)) + extra * rng.normal(size=(n, 5)) @ directions.T).astype(np.float32)

    def labels(n):
        return np.array(["a", "b"] * (n // 2))

    reference = cells(400, 0.0)
    equal = metrics.expression_two_sample(reference, labels(400), cells(400, 1.0), labels(400), genes, n_hvg=n_genes,
                                          seed=0)["overall"]
    larger = metrics.expression_two_sample(reference, labels(400), cells(4000, 1.0), labels(4000), genes,
                                           n_hvg=n_genes, seed=0)["overall"]
    assert larger["n_reference"] == larger["n_compared"] == 400
    assert abs(larger["rf_auc"] - equal["rf_auc"]) < 0.07 and abs(larger["knn_auc"] - equal["knn_auc"]) < 0.07
    # the same pools scored in a feature space fitted on the unbalanced pool: the larger side's directions win
    compared = cells(4000, 1.0)
    space = features.FeatureSpace(np.vstack([reference, compared]), genes, n_genes, 50, 0)
    unbalanced = metrics.two_sample(space.embed(reference), labels(400), space.embed(compared), labels(4000),
                                    seed=0)["overall"]
    assert unbalanced["rf_auc"] > larger["rf_auc"] + 0.07


def test_latent_moments_measure_spread_and_shift_in_reference_units():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4000, 8)) * 2.0
    narrow = metrics.latent_moments(reference, rng.normal(size=(4000, 8)))  # half the sd: a quarter of the variance
    assert narrow["log2_var_ratio_median"] == pytest.approx(-2.0, abs=0.15)
    assert narrow["narrow_dims"] == 1.0 and narrow["mean_shift"] < 0.1
    moved = metrics.latent_moments(reference, rng.normal(size=(4000, 8)) * 2.0 + 2.0)  # shifted by one sd
    assert moved["mean_shift"] == pytest.approx(1.0, abs=0.1)
    assert moved["log2_var_ratio_median"] == pytest.approx(0.0, abs=0.15) and moved["narrow_dims"] == 0.0
    assert moved["norm"]["q50"] > narrow["norm"]["q50"]


def test_observation_comparison_sees_overdispersion_zeros_and_library_sizes():
    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, 1.0, size=60)
    reference = rng.poisson(rates, size=(3000, 60))
    same = metrics.observation_comparison(reference, rng.poisson(rates, size=(3000, 60)))
    overdispersed = metrics.observation_comparison(reference, rng.poisson(rates * rng.gamma(0.5, 2.0, size=(3000, 60))))
    deeper = metrics.observation_comparison(reference, rng.poisson(2.0 * rates, size=(3000, 60)))
    assert abs(same["dispersion_log2_ratio_median"]) < 0.1 and same["gene_zero_fraction_pearson"] > 0.99
    assert overdispersed["dispersion_log2_ratio_median"] > 0.5
    assert overdispersed["gene_zero_fraction_mean_diff"] > 0.05
    ratio = deeper["library_size_compared"]["q50"] / deeper["library_size_reference"]["q50"]
    assert ratio == pytest.approx(2.0, rel=0.05)
    assert deeper["cell_zero_fraction_compared"] < deeper["cell_zero_fraction_reference"]


def test_poisson_from_means_keeps_shares_and_library_sizes():
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.ones(30), size=400)
    totals = rng.uniform(500, 2000, size=400)
    counts = gap_analysis.poisson_from_means(np.log1p(shares * gap_analysis.TARGET_SUM), totals, seed=0)
    assert np.allclose(counts.sum(axis=1) / totals, 1.0, atol=0.2)
    expected = shares * totals[:, None]
    assert np.allclose(counts.mean(axis=0), expected.mean(axis=0), rtol=0.1)
    residual = (counts - expected) / np.sqrt(expected)  # Poisson: unit variance, no extra dispersion
    assert residual.var() == pytest.approx(1.0, abs=0.05)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Split -> tiny autoencoder -> tiny diffusion model -> matched-count samples."""
    root = tmp_path_factory.mktemp("gap")
    data = root / "counts.h5ad"
    make_counts_adata(n_cells=200, n_genes=40, seed=2).write_h5ad(data)
    split.main(["--data_dir", str(data), "--out", str(root / "split"), "--seed", "0"])
    train = str(root / "split" / "train.h5ad")
    vae = VAE_train.main(["--data_dir", train, "--save_dir", str(root / "ae"), "--max_steps", "30",
                          "--hidden_dims", "32", "32", "--latent_dim", "8", "--batch_size", "64", "--progress", "False"])
    model = cell_train.main(["--data_dir", train, "--vae_path", vae, "--model_name", "tiny", "--save_dir",
                             str(root / "diffusion"), "--lr_anneal_steps", "10", "--save_interval", "10",
                             "--num_classes", "3", "--progress", "False", "--hidden_dims", "32", "32", "16", "8"])
    cell_sample.main(["--model_path", model, "--sample_dir", str(root / "samples"), "--match_counts",
                      "--progress", "False"])
    return {"root": root, "train": train, "heldout": str(root / "split" / "heldout.h5ad"), "vae": vae,
            "samples": str(root / "samples")}


def run(pipeline, out, *extra):
    return gap_analysis.main(["--train", pipeline["train"], "--heldout", pipeline["heldout"], "--vae_path",
                              pipeline["vae"], "--samples", pipeline["samples"], "--out", str(out),
                              "--progress", "False", *extra])


def test_cli_writes_every_section_and_the_report(pipeline, tmp_path):
    out = tmp_path / "gap"
    run(pipeline, out, "--random_forest", "False")
    results = json.loads((out / "gap_analysis.json").read_text())
    assert set(results["expression"]) == set(gap_analysis.EXPRESSION_SETS)
    assert results["expression"]["train"]["overall"]["n_reference"] == 40  # the held-out 20%
    assert {"train", "generated", "generated_on_sphere", "generated_vs_train", "heldout_norm"} <= set(results["latent"])
    assert results["latent"]["generated_on_sphere"]["moments"]["norm"]["q05"] == pytest.approx(1.0, abs=1e-5)
    assert results["latent"]["heldout_norm"]["q50"] == pytest.approx(1.0, abs=1e-5)  # the encoder's L2 norm
    assert results["observation"]["generated"]["library_size_reference"]["q50"] > 0
    counts = {row["label"]: row for row in results["per_label"]}
    assert sum(row["n_heldout"] for row in counts.values()) == 40
    assert all(row["n_generated"] == row["n_train"] for row in counts.values())  # --match_counts
    report = (out / "gap_analysis.md").read_text()
    for heading in ("(a) Expression", "(b) Latent", "(c) Observation", "(d) Per label"):
        assert heading in report
    # the reconstruction of the held-out cells draws counts around each cell's own library size
    observed = results["observation"]["reconstructed_heldout_counts"]
    ratio = observed["library_size_compared"]["q50"] / observed["library_size_reference"]["q50"]
    assert 0.5 < ratio < 2.0


def test_cli_refuses_a_folder_without_samples_in_one_line(pipeline, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as error:
        gap_analysis.main(["--train", pipeline["train"], "--heldout", pipeline["heldout"], "--vae_path",
                           pipeline["vae"], "--samples", str(empty), "--out", str(tmp_path / "out"),
                           "--progress", "False"])
    assert error.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error:") and "generated.h5ad" in message and "\n" not in message
    assert not (tmp_path / "out" / "gap_analysis.json").exists()


def test_a_variational_autoencoder_runs_end_to_end_without_the_sphere_projection(tmp_path):
    """--kl_weight > 0: the diffusion model trains on posterior means, the sampler decodes them, and the gap
    analysis leaves out the unit-sphere sets (a variational latent is not normalized)."""
    data = tmp_path / "counts.h5ad"
    make_counts_adata(n_cells=150, n_genes=40, seed=4).write_h5ad(data)
    split.main(["--data_dir", str(data), "--out", str(tmp_path / "split"), "--seed", "0"])
    train = str(tmp_path / "split" / "train.h5ad")
    vae = VAE_train.main(["--data_dir", train, "--save_dir", str(tmp_path / "ae"), "--max_steps", "20",
                          "--hidden_dims", "32", "--latent_dim", "6", "--kl_weight", "1", "--batch_size", "64",
                          "--progress", "False"])
    model = cell_train.main(["--data_dir", train, "--vae_path", vae, "--model_name", "tiny", "--save_dir",
                             str(tmp_path / "diffusion"), "--lr_anneal_steps", "10", "--save_interval", "10",
                             "--num_classes", "3", "--progress", "False", "--hidden_dims", "32", "16"])
    cell_sample.main(["--model_path", model, "--sample_dir", str(tmp_path / "samples"), "--match_counts",
                      "--progress", "False"])
    pipeline = {"train": train, "heldout": str(tmp_path / "split" / "heldout.h5ad"), "vae": vae,
                "samples": str(tmp_path / "samples")}
    run(pipeline, tmp_path / "gap", "--random_forest", "False")
    results = json.loads((tmp_path / "gap" / "gap_analysis.json").read_text())
    assert "generated_on_sphere" not in results["expression"] and "generated_on_sphere" not in results["latent"]
    assert {"train", "generated", "reconstructed_train_counts"} <= set(results["expression"])
    assert results["latent"]["heldout_norm"]["q50"] != pytest.approx(1.0, abs=1e-3)
    assert "(b) Latent" in (tmp_path / "gap" / "gap_analysis.md").read_text()
