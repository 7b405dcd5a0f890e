"""Held-out evaluation: the split tool, negative controls, DE fidelity, novelty and usefulness on cases
with known answers, and the evaluator's refusals and warnings for inputs that would give wrong figures."""
import json
import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from exp_script import split as split_script
from exp_script.augment import main as augment_main
from exp_script.evaluate import main as evaluate_main
from exp_script.evaluation import de_fidelity as de
from exp_script.evaluation.controls import collapsed, log_normalize, memorizer
from exp_script.evaluation.novelty import novelty
from exp_script.evaluation.usefulness import UsefulnessSettings, augmentation
from synthetic import REPO_ROOT

N_GENES = 120
TYPES = {"alpha": 200, "beta": 200, "delta": 150, "rare": 24}  # cells per type before the split


def draw(counts_per_type, seed, donor_effect=True):
    """Poisson counts: each type over-expresses its own gene block; donor1 triples a second block within
    every type (a condition effect; genes 80-119). Returns counts, types and donors."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0).gamma(1.5, 1.0, size=N_GENES)
    counts, types, donors = [], [], []
    for t, (name, n) in enumerate(counts_per_type.items()):
        rates = np.tile(base, (n, 1))
        rates[:, t * 20:(t + 1) * 20] *= 8.0
        donor = rng.integers(0, 2, size=n)
        if donor_effect:
            rates[donor == 1, 80:] *= 3.0
        rates *= rng.uniform(0.6, 1.4, size=(n, 1))
        counts.append(rng.poisson(rates))
        types += [name] * n
        donors += [f"donor{d}" for d in donor]
    return np.vstack(counts).astype(np.float32), np.array(types), np.array(donors)


def write_counts(path, counts, types, donors, prefix="cell"):
    obs = pd.DataFrame({"cell_type1": pd.Categorical(types), "donor": pd.Categorical(donors)},
                       index=[f"{prefix}{i}" for i in range(len(types))])
    anndata.AnnData(X=sp.csr_matrix(counts), obs=obs,
                    var=pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)])).write_h5ad(path)
    return str(path)


def write_log(path, values, types, donors=None, genes=None):
    """Like the sampler's output: log-normalized X with labels in obs."""
    columns = {"cell_type1": pd.Categorical(types)}
    if donors is not None:
        columns["donor"] = pd.Categorical(donors)
    obs = pd.DataFrame(columns, index=[f"generated_{i}" for i in range(len(types))])
    genes = genes or [f"gene{j}" for j in range(values.shape[1])]
    anndata.AnnData(X=np.asarray(values, np.float32), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A data file split into train/held-out with the split tool, and generated cells drawn afresh from the
    same distribution (a generator that learned it), as many per type as training had."""
    folder = tmp_path_factory.mktemp("heldout")
    data = write_counts(folder / "data.h5ad", *draw(TYPES, seed=1))
    paths = split_script.main(["--data_dir", data, "--out", str(folder / "split"), "--seed", "0"])
    train = anndata.read_h5ad(paths["train"])
    wanted = train.obs["cell_type1"].value_counts().to_dict()
    counts, types, donors = draw({name: wanted[name] for name in TYPES}, seed=2)
    generated = write_log(folder / "generated.h5ad", log_normalize(counts), types, donors)
    return {"folder": folder, "data": data, "generated": generated, **paths}


def evaluate(study, out, *extra):
    return evaluate_main(["--real", study["heldout"], "--train", study["train"], "--generated", study["generated"],
                          "--out", str(out), "--progress", "False", "--plots", "False", *extra])


def refused(capsys, argv, expected, main=evaluate_main):
    with pytest.raises(SystemExit) as exit_info:
        main([str(item) for item in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]


# ---- the split tool --------------------------------------------------------------------------------------
def test_split_is_stratified_seeded_and_reusable(study, tmp_path):
    table = pd.read_csv(study["split"])
    for name, total in TYPES.items():
        heldout = ((table["label"] == name) & (table["side"] == "heldout")).sum()
        assert heldout == round(0.2 * total)
    assert anndata.read_h5ad(study["heldout"]).n_obs + anndata.read_h5ad(study["train"]).n_obs == sum(TYPES.values())
    again = split_script.main(["--data_dir", study["data"], "--out", str(tmp_path / "again"), "--seed", "0"])
    assert pd.read_csv(again["split"]).equals(table)
    other = split_script.main(["--data_dir", study["data"], "--out", str(tmp_path / "other"), "--seed", "1"])
    assert not pd.read_csv(other["split"])["side"].equals(table["side"])
    reused = split_script.main(["--data_dir", study["data"], "--out", str(tmp_path / "reused"), "--seed", "5",
                                "--from_split", study["split"]])
    assert pd.read_csv(reused["split"]).equals(table)
    assert not [name for name in os.listdir(tmp_path / "reused") if ".tmp" in name]


def test_split_refuses_an_unknown_label_key(study, tmp_path, capsys):
    refused(capsys, ["--data_dir", study["data"], "--out", tmp_path / "s", "--label_key", "tissue"],
            "label key 'tissue' not in", main=split_script.main)
    assert not (tmp_path / "s").exists()


# ---- known answers -------------------------------------------------------------------------------------
def test_identical_sets_give_lfc_correlation_one_and_shuffled_labels_about_zero():
    counts, types, _ = draw(TYPES, seed=3)
    x, genes, labels = log_normalize(counts), [f"gene{j}" for j in range(N_GENES)], sorted(TYPES)
    same, _ = de.one_vs_rest(x, types, x, types, genes, labels)
    for figures in same.values():
        assert figures["lfc_pearson"] == pytest.approx(1.0) and figures["lfc_spearman"] == pytest.approx(1.0)
        assert figures["top50_precision"] == 1.0 and figures["sign_agreement"] == 1.0
    shuffled_types = np.random.default_rng(0).permutation(types)
    shuffled, _ = de.one_vs_rest(x, types, x, shuffled_types, genes, labels)
    assert abs(de.median_of(shuffled, "lfc_pearson")) < 0.3
    assert de.median_of(shuffled, "top50_precision") < 0.6


def test_condition_effect_within_a_type_is_recovered_and_lost_without_it():
    counts, types, donors = draw(TYPES, seed=4)
    twin_counts, twin_types, twin_donors = draw(TYPES, seed=5)
    flat_counts, flat_types, flat_donors = draw(TYPES, seed=5, donor_effect=False)
    genes, labels = [f"gene{j}" for j in range(N_GENES)], sorted(TYPES)
    x = log_normalize(counts)
    kept = de.within_label_conditions(x, types, donors, log_normalize(twin_counts), twin_types, twin_donors,
                                      genes, labels)
    lost = de.within_label_conditions(x, types, donors, log_normalize(flat_counts), flat_types, flat_donors,
                                      genes, labels)
    enough = [label for label in labels
              if min(((t == label) & (d == donor)).sum() for t, d in ((types, donors), (twin_types, twin_donors))
                     for donor in ("donor0", "donor1")) >= de.CONDITION_MIN_CELLS]
    assert set(kept) == {f"{label}: donor0 vs donor1" for label in enough} and len(enough) >= 3
    assert de.median_of(kept, "lfc_pearson") > de.median_of(lost, "lfc_pearson") + 0.2


def test_memorizer_fails_novelty_and_heldout_cells_pass():
    rng = np.random.default_rng(0)
    train, reference, fresh = (rng.normal(size=(n, 10)) for n in (400, 200, 200))
    copies = train[rng.integers(0, 400, size=200)]
    figures = novelty(train, reference, {"heldout": fresh, "memorizer": copies})["sections"]
    assert figures["heldout"]["passes"] and 0.8 < figures["heldout"]["distance_ratio"] < 1.25
    assert not figures["memorizer"]["passes"]
    assert figures["memorizer"]["fraction_closer"] == 1.0 and figures["memorizer"]["distance_ratio"] == 0.0


def test_negative_controls_have_the_requested_cells_per_label():
    counts, types, _ = draw(TYPES, seed=6)
    wanted = {"alpha": 5, "rare": 7}
    rng = np.random.default_rng(0)
    x, labels, rows = memorizer(log_normalize(counts), types, wanted, rng)
    assert sorted(labels.tolist()) == ["alpha"] * 5 + ["rare"] * 7 and np.array_equal(x, log_normalize(counts)[rows])
    totals = counts.sum(axis=1)
    drawn, drawn_labels = collapsed(types, wanted, rng, counts=counts, totals=totals)
    assert sorted(drawn_labels.tolist()) == ["alpha"] * 5 + ["rare"] * 7
    members = log_normalize(counts)[types == "rare"]
    spread_real = members.std(axis=0).mean()
    assert drawn[drawn_labels == "rare"].std(axis=0).mean() < spread_real  # collapsed: less variation
    linear_drawn, linear_real = np.expm1(drawn[drawn_labels == "rare"]).mean(0), np.expm1(members).mean(0)
    assert np.corrcoef(linear_drawn, linear_real)[0, 1] > 0.95  # around the label's mean profile


def test_augmentation_with_real_heldout_like_cells_does_not_hurt():
    counts, types, _ = draw({"alpha": 60, "beta": 60, "rare": 6}, seed=7)
    heldout_counts, heldout_types, _ = draw({"alpha": 40, "beta": 40, "rare": 20}, seed=8)
    extra_counts, extra_types, _ = draw({"alpha": 0, "beta": 0, "rare": 40}, seed=9)
    settings = UsefulnessSettings(seeds=3, rare_max_cells=30)
    result = augmentation(log_normalize(counts), types, log_normalize(heldout_counts), heldout_types,
                          {"real-like": (log_normalize(extra_counts), extra_types)}, settings)
    assert result["rare_labels"] == {"rare": 6}
    without, with_real = result["variants"]["real only"], result["variants"]["real + real-like"]
    assert with_real["macro_f1"]["mean"] >= without["macro_f1"]["mean"] - 0.02
    assert with_real["per_label"]["rare"]["recall"]["mean"] >= without["per_label"]["rare"]["recall"]["mean"]


# ---- the whole evaluation with --train ------------------------------------------------------------------
def test_every_new_figure_lands_in_metrics_and_report(study, tmp_path):
    out = tmp_path / "out"
    result = evaluate(study, out, "--condition_key", "donor", "--augmentation_seeds", "2", "--condition_min_cells", "5",
                      "--metrics", "scc", "knn_auc", "de_lfc_pearson", "de_lfc_spearman", "de_top50_precision",
                      "de_sign_agreement", "de_condition_lfc_pearson", "de_condition_lfc_spearman")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["sections"] == ["generated", "real_vs_real", "train_vs_heldout", "memorizer", "collapsed"]
    assert saved["positive_control"] == "train_vs_heldout" and saved["collapsed_kind"] == "counts"
    for section in saved["sections"]:
        for name in ("de_lfc_pearson", "de_top50_precision", "de_sign_agreement", "de_condition_lfc_pearson"):
            assert name in saved[section]["overall"]
    # a generator that learned the distribution scores like the positive control on DE
    positive = saved["train_vs_heldout"]["overall"]["de_lfc_pearson"]
    assert saved["generated"]["overall"]["de_lfc_pearson"] > positive - 0.1
    pairs = saved["generated"]["condition_effects"]["donor"]
    assert pairs and all(pair.endswith("donor0 vs donor1") for pair in pairs)
    novelty_figures = saved["novelty"]["sections"]
    assert novelty_figures["real_vs_real"]["passes"] and novelty_figures["generated"]["passes"]
    assert not novelty_figures["memorizer"]["passes"]
    tstr = saved["usefulness"]["train_on_synthetic"]
    assert set(tstr) == {"real training cells", "generated", "memorizer", "collapsed"}
    assert tstr["generated"]["accuracy"] > 0.9
    assert "rare" in saved["usefulness"]["augmentation"]["rare_labels"]
    assert set(saved["usefulness"]["augmentation"]["variants"]) == {"real only", "real + generated",
                                                                   "real + memorizer", "real + collapsed"}
    assert set(saved["blind_spots"]["scc"]) == {"memorizer", "collapsed"}
    report = (out / "report.md").read_text()
    for text in ("## Novelty (memorization)", "## Usefulness", "## Condition effects within a label",
                 "memorizer (negative control)", "collapsed (negative control)", "| de_lfc_pearson |",
                 "Rare-type augmentation", "real + generated", "train vs held-out (positive control)"):
        assert text in report, text
    assert result["usefulness"]["heldout_cells"] == saved["inputs"]["real"]["cells_used"]


def test_augment_cli_writes_its_tables(study, tmp_path):
    augment_main(["--train", study["train"], "--heldout", study["heldout"], "--generated", study["generated"],
                  "--out", str(tmp_path), "--seeds", "2", "--controls", "False"])
    saved = json.loads((tmp_path / "usefulness.json").read_text())
    assert set(saved["train_on_synthetic"]) == {"real training cells", "generated"}
    assert "real + generated" in (tmp_path / "usefulness.md").read_text()


# ---- inputs that would give wrong figures ---------------------------------------------------------------
def test_refused_run_keeps_the_previous_results(study, tmp_path, capsys):
    out = tmp_path / "out"
    evaluate(study, out, "--metrics", "scc", "--controls", "False")
    before = (out / "metrics.json").read_text()
    (out / "umap.png").write_bytes(b"stale")  # a plot from an earlier run with plots
    capsys.readouterr()
    refused(capsys, ["--real", study["heldout"], "--generated", tmp_path / "absent.h5ad", "--out", out,
                     "--progress", "False"], "data file not found")
    assert (out / "metrics.json").read_text() == before and (out / "umap.png").exists()
    evaluate(study, out, "--metrics", "scc", "--controls", "False")
    assert not (out / "umap.png").exists(), "a stale plot survived a run without plots"


@pytest.mark.parametrize("case", ["few_genes", "z_scored", "label_case", "one_cell", "counts_as_log"])
def test_inputs_that_would_give_wrong_figures_are_refused(study, tmp_path, capsys, case):
    counts, types, donors = draw({"alpha": 20, "beta": 20}, seed=10)
    values = log_normalize(counts)
    args = ["--real", study["heldout"], "--out", tmp_path / "out", "--progress", "False"]
    if case == "few_genes":
        path = write_log(tmp_path / "g.h5ad", values[:, :3], types, genes=["gene0", "gene1", "gene2"])
        expected = "share 3 gene names; at least 50 are needed"
    elif case == "z_scored":
        path = write_log(tmp_path / "g.h5ad", (values - values.mean(0)) / (values.std(0) + 1e-6), types)
        expected = "negative values (minimum"
    elif case == "label_case":
        path = write_log(tmp_path / "g.h5ad", values, np.char.upper(types.astype(str)))
        expected = "generated label 'ALPHA' differs from the real label 'alpha' only in case"
    elif case == "one_cell":
        path = write_log(tmp_path / "g.h5ad", values[:1], types[:1])
        expected = "the generated file has 1 cells; at least --min_cells 10"
    else:
        path = write_log(tmp_path / "g.h5ad", values, types)
        args = ["--real", study["heldout"], "--input_is_log", "True", "--out", tmp_path / "out", "--progress", "False"]
        expected = "--input_is_log True, but the values look like raw counts"
    refused(capsys, args + ["--generated", path], expected)
    assert not (tmp_path / "out").exists()


def test_two_raw_count_files_and_warnings_in_metrics(study, tmp_path, capsys):
    """--generated_layer/--generated_input_is_log read a counts file; a partial gene overlap and a skipped
    label are warned about on stderr and recorded in metrics.json; --filter is recorded in the report."""
    counts, types, donors = draw({"alpha": 30, "beta": 30, "delta": 3}, seed=11)
    keep = 55  # of 120 genes: under half shared
    obs = pd.DataFrame({"cell_type1": types, "donor": donors}, index=[f"g{i}" for i in range(len(types))])
    adata = anndata.AnnData(X=log_normalize(counts)[:, :keep], obs=obs,
                            var=pd.DataFrame(index=[f"gene{j}" for j in range(keep)]))
    adata.layers["counts"] = sp.csr_matrix(counts[:, :keep])
    adata.write_h5ad(tmp_path / "counts.h5ad")
    out = tmp_path / "out"
    evaluate_main(["--real", study["heldout"], "--generated", str(tmp_path / "counts.h5ad"), "--out", str(out),
                   "--generated_layer", "counts", "--generated_input_is_log", "False", "--filter",
                   "donor=donor0,donor1", "--progress", "False", "--plots", "False", "--controls", "False",
                   "--metrics", "scc"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["inputs"]["generated"]["layer"] == "counts" and not saved["inputs"]["generated"]["input_is_log"]
    assert saved["inputs"]["shared_genes"] == keep and saved["generated"]["overall"]["scc"] > 0.9
    err = capsys.readouterr().err
    assert "warning: only 55 of the 120 genes of the real file are shared" in err
    assert any("only 55 of the 120 genes" in warning for warning in saved["warnings"])
    assert any("label 'delta': no per-label figure" in warning for warning in saved["warnings"])
    assert "filters: donor=donor0,donor1" in (out / "report.md").read_text()


def test_integer_log_override_is_accepted(study, tmp_path):
    counts, types, _ = draw({"alpha": 20, "beta": 20}, seed=12)
    path = write_log(tmp_path / "g.h5ad", log_normalize(counts), types)
    result = evaluate_main(["--real", study["data"], "--input_is_log", "True", "--allow_count_like_log", "True",
                            "--generated", path, "--out", str(tmp_path / "out"), "--progress", "False",
                            "--plots", "False", "--metrics", "scc", "--controls", "False"])
    assert result["inputs"]["real"]["input_is_log"]


def test_celltypist_leaves_the_home_folder_alone(tmp_path):
    code = ("from exp_script.evaluation import metrics, pipeline\n"
            "with metrics._quiet_celltypist(): import celltypist")
    env = {key: value for key, value in os.environ.items() if key != "CELLTYPIST_FOLDER"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True, capture_output=True,
                   timeout=300)
    assert not (tmp_path / ".celltypist").exists()


def test_demo_writes_each_run_into_its_own_folder():
    script = (REPO_ROOT / "scripts" / "demo.sh").read_text()
    assert "rm -rf" not in script and "run-$(date" in script and "ln -sfn" in script
    assert "--train" in script and "exp_script/split.py" in script
    # the autoencoder stops on its own validation loss (inside the training split) and its best weights are used
    assert "--early_stopping_patience" in script and 'AE="$OUT/autoencoder/model_seed=0_best.pt"' in script
