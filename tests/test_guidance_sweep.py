"""The guidance sweep and the unseen-combination tools on tiny data: what they write, the rules they apply,
and that their scores tell a faithful generator from a degenerate one."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from exp_script import guidance_sweep, unseen_combination
from exp_script.evaluation.label_classifier import fit_label_classifier
from exp_script.evaluation.unseen_guidance import donor_shift_references
from test_checkpoints import LEGACY, MODEL, VAE, refused

N_GENES = 30


def donor_data(cells_per_combination=30, types=("alpha", "beta"), donors=("d0", "d1", "d2"), seed=0,
               donor_effect=True, type_specific=False, depth=1.0):
    """Counts where each type over-expresses a block of genes and each donor another (if ``donor_effect``); with
    ``type_specific`` the donor's block depends on the type too (beta cells of donor d show donor d+1's block);
    ``depth`` scales every rate."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for t, cell_type in enumerate(types):
        for d, donor in enumerate(donors):
            rates = np.full((cells_per_combination, N_GENES), 2.0 * depth)
            rates[:, 5 * t:5 * t + 5] *= 6
            if donor_effect:
                block = (d + t * type_specific) % len(donors)
                rates[:, 15 + 5 * block:20 + 5 * block] *= 5
            rows.append(rng.poisson(rates * rng.uniform(0.7, 1.3, (cells_per_combination, 1))))
            obs += [(cell_type, donor)] * cells_per_combination
    obs = pd.DataFrame(obs, columns=["cell_type1", "donor"], index=[f"c{i}" for i in range(len(obs))])
    return anndata.AnnData(sp.csr_matrix(np.vstack(rows).astype(np.float32)), obs=obs.astype("category"),
                           var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]))


def as_generated(adata):
    """A real-looking file as the sampler writes it: log-normalized X."""
    generated = adata.copy()
    x = generated.X.toarray()
    generated.X = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    return generated


# ---- unseen combination ----------------------------------------------------------------------------
def test_exclude_writes_the_training_file_without_the_combination(tmp_path):
    data = tmp_path / "all.h5ad"
    donor_data().write_h5ad(data)
    removed, kept = unseen_combination.main(["exclude", "--data", str(data), "--out", str(tmp_path / "train.h5ad"),
                                             "--cell_type", "beta", "--donor", "d2"])
    train = anndata.read_h5ad(tmp_path / "train.h5ad")
    assert (removed, kept) == (30, 150) and train.n_obs == 150
    combination = (train.obs["cell_type1"] == "beta") & (train.obs["donor"] == "d2")
    assert not combination.any() and (train.obs["donor"] == "d2").sum() == 30


def test_exclude_refuses_values_the_data_lacks(tmp_path, capsys):
    data = tmp_path / "all.h5ad"
    donor_data().write_h5ad(data)
    line = refused(capsys, unseen_combination.main, ["exclude", "--data", str(data), "--out", str(tmp_path / "t.h5ad"),
                                                     "--cell_type", "gamma", "--donor", "d2"])
    assert line == "error: cell_type1=gamma: not in the data; values of cell_type1: alpha, beta"
    assert not (tmp_path / "t.h5ad").exists()


def score(tmp_path, generated, blind=None, real_data=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    real, path = tmp_path / "real.h5ad", tmp_path / "generated.h5ad"
    (donor_data() if real_data is None else real_data).write_h5ad(real)
    as_generated(generated).write_h5ad(path)
    argv = ["score", "--real", str(real), "--generated", str(path), "--cell_type", "beta", "--donor", "d2",
            "--out", str(tmp_path / "out")]
    if blind is not None:
        as_generated(blind).write_h5ad(tmp_path / "blind.h5ad")
        argv += ["--donor_blind", str(tmp_path / "blind.h5ad")]
    return unseen_combination.main(argv)


def test_a_faithful_generator_passes_and_a_donor_blind_one_fails(tmp_path):
    faithful = donor_data(seed=1)  # fresh cells of every combination, as a perfect generator would give
    result = score(tmp_path / "faithful", faithful)
    summary = result["summary"]
    assert summary["held_out_real_called_correctly"] > 0.9
    assert summary["held_out_generated_called_correctly"] > 0.9 and summary["passes_half_of_real"]
    assert summary["seen_generated_called_correctly_mean"] > 0.9
    assert summary["donor_blind_real_called_held_out"] < 0.1
    assert summary["held_out_knn_auc"] < 0.75
    assert summary["seen_generated_called_wrong_mean"] < 0.1 and summary["seen_knn_auc_mean"] < 0.75
    assert (tmp_path / "faithful" / "out" / "unseen_combination.md").exists()

    blind = donor_data(seed=2)  # the held-out combination generated with the other donors' beta cells
    beta_d2 = ((blind.obs["cell_type1"] == "beta") & (blind.obs["donor"] == "d2")).to_numpy()
    beta_d0 = np.flatnonzero(((blind.obs["cell_type1"] == "beta") & (blind.obs["donor"] == "d0")).to_numpy())
    values = blind.X.toarray()
    values[beta_d2] = values[beta_d0]
    blind.X = sp.csr_matrix(values)
    unconditioned = donor_data(seed=3, donors=("d0", "d1"))
    result = score(tmp_path / "blind", blind, blind=unconditioned)
    summary = result["summary"]
    assert summary["held_out_generated_called_correctly"] < 0.1 and not summary["passes_half_of_real"]
    assert summary["donor_blind_sample_called_held_out"] < 0.1
    assert summary["held_out_knn_auc"] > 0.9  # the held-out donor's cells look like another donor's
    # ... and so they score as the other donors' real cells do (the reference the score reports beside it)
    assert summary["held_out_other_donors_real_knn_auc"] > 0.9
    assert abs(summary["held_out_other_donors_real_knn_auc"] - summary["held_out_knn_auc"]) < 0.1
    assert summary["seen_knn_auc_mean"] < 0.75  # the seen combinations stay faithful: the reference
    held_out = next(row for row in result["donors"] if row["held_out"])
    assert held_out["donor"] == "d2" and held_out["real_cells"] == 30 and held_out["generated_cells"] == 30


@pytest.mark.parametrize("type_specific", [False, True])
def test_the_donor_shift_references_are_realistic_exactly_when_the_donor_effect_is_additive(tmp_path, type_specific):
    # deep enough that a gene's log-expression has few zeros and enough cells that its mean shift is measured
    # within ~0.1
    real = donor_data(cells_per_combination=60, type_specific=type_specific, depth=10)
    result = score(tmp_path, donor_data(seed=1, type_specific=type_specific, depth=10), real_data=real)
    summary = result["summary"]
    assert summary["held_out_additive_shift_types"] == ["alpha"]
    # the oracle moves the other donors' beta cells to the combination's own mean: right in both worlds
    assert summary["held_out_own_mean_shift_called_correctly"] > 0.9
    assert summary["held_out_own_mean_shift_knn_auc"] < 0.75
    assert summary["held_out_other_donors_real_knn_auc"] > 0.9
    if not type_specific:  # d2's effect on alpha is its effect on beta: the additive shift recovers the combination
        assert summary["held_out_additive_shift_called_correctly"] > 0.9
        assert summary["held_out_additive_shift_knn_auc"] < 0.75
    else:  # beta cells of d2 show another block than alpha cells of d2: no additive effect can get them right
        assert summary["held_out_additive_shift_called_correctly"] < 0.2
        assert summary["held_out_additive_shift_knn_auc"] > 0.9
    text = (tmp_path / "out" / "unseen_combination.md").read_text()
    assert "held_out_additive_shift_knn_auc" in text and "held_out_own_mean_shift_knn_auc" in text


def test_the_donor_shift_references_are_empty_without_another_type_of_the_donor():
    real = donor_data()
    x = real.X.toarray().astype(np.float32)
    keep = ~((real.obs["cell_type1"] == "alpha") & (real.obs["donor"] == "d2")).to_numpy()
    obs = real.obs[keep].astype(str)
    classifier = fit_label_classifier(x[keep][(obs["cell_type1"] == "beta").to_numpy()],
                                      obs["donor"].to_numpy()[(obs["cell_type1"] == "beta").to_numpy()])
    result = donor_shift_references(x[keep], obs, "cell_type1", "donor", "beta", "d2", classifier, 30)
    assert result["additive_shift_knn_auc"] is None and result["additive_shift_types"] == []
    assert result["own_mean_shift_knn_auc"] is not None


# ---- guidance sweep --------------------------------------------------------------------------------
def test_within_label_distance_is_one_for_real_cells_and_zero_for_a_collapsed_generator():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(60, 5)), np.repeat(["a", "b", "c"], 20)
    real = guidance_sweep.within_label_distance(features, labels)
    assert real > 0
    collapsed = np.vstack([np.tile(features[labels == label].mean(0), (20, 1)) for label in "abc"])
    assert guidance_sweep.within_label_distance(collapsed, labels) == pytest.approx(0, abs=1e-9)
    assert guidance_sweep.within_label_distance(2 * features, labels) == pytest.approx(2 * real)


def test_the_recommendation_follows_its_rule():
    summary = pd.DataFrame({"guide_w": ["0", "1", "3"], "knn_auc": [0.55, 0.62, 0.80],
                            "label_accuracy": [0.80, 0.95, 0.99]})
    assert guidance_sweep.recommend(summary, real_accuracy=0.96)["guide_w"] == "1"  # 0 labels too poorly
    assert guidance_sweep.recommend(summary, real_accuracy=0.80)["guide_w"] == "0"
    assert guidance_sweep.recommend(summary, real_accuracy=1.5)["guide_w"] == "3"  # none eligible: best labels


def test_the_sweep_writes_a_table_a_summary_and_a_plot(tmp_path):
    out = tmp_path / "sweep"
    table, summary, chosen = guidance_sweep.main([
        "--model_path", str(LEGACY / MODEL), "--vae_path", str(LEGACY / VAE), "--validation",
        str(LEGACY / "counts.h5ad"), "--weights", "0", "donor=2", "--seeds", "0", "1", "--out", str(out),
        "--timestep_respacing", "5", "--max_per_condition", "6"])
    written = pd.read_csv(out / "guidance_sweep.csv")
    assert list(written["guide_w"]) == ["0", "0", "cell_type1=0,donor=2", "cell_type1=0,donor=2"]
    assert list(written["seed"]) == [0, 1, 0, 1]
    assert written[["knn_auc", "label_accuracy", "diversity_ratio"]].notna().all().all()
    assert written["knn_auc"].between(0, 1).all() and written["label_accuracy"].between(0, 1).all()
    assert list(summary["guide_w"]) == ["0", "cell_type1=0,donor=2"]
    assert chosen["guide_w"] in set(summary["guide_w"])
    assert "**(recommended)**" in (out / "guidance_sweep.md").read_text()
    assert (out / "guidance_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweep_refuses_an_unknown_label_key(tmp_path, capsys):
    line = refused(capsys, guidance_sweep.main, [
        "--model_path", str(LEGACY / MODEL), "--vae_path", str(LEGACY / VAE), "--validation",
        str(LEGACY / "counts.h5ad"), "--weights", "batch=1", "--out", str(tmp_path / "s")])
    assert line == "error: --guide_w key 'batch' is not a label key of this model; label keys: cell_type1, donor"


def test_other_real_cells_are_as_diverse_as_the_validation_cells():
    # real cells of the same kind score ~1 (a PCA fitted on the cells it measures would inflate their spread)
    rng = np.random.default_rng(1)
    n_genes, per_label = 300, 80

    def cells(seed):
        r = np.random.default_rng(seed)
        centers = np.repeat(np.eye(3, n_genes) * 3, per_label, axis=0)
        return (centers + r.normal(size=(3 * per_label, n_genes))).astype(np.float32)

    labels = np.repeat(["a", "b", "c"], per_label)
    reference = guidance_sweep.Reference(cells(0), labels, n_hvg=200, n_pcs=30)
    assert reference.score(cells(1), labels)["diversity_ratio"] == pytest.approx(1.0, abs=0.08)
    collapsed = np.repeat(np.eye(3, n_genes) * 3, per_label, axis=0).astype(np.float32)
    assert reference.score(collapsed, labels)["diversity_ratio"] < 0.05
