"""Evaluation of generated cells: each metric on cases with a known answer, the CLI end to end,
bad input, and the notebooks run headless."""
import json
import sys
from pathlib import Path

import anndata
import nbformat
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from exp_script.evaluation import metrics as m
from exp_script.evaluation import pipeline as evaluation
from exp_script.evaluation.settings import CONDITION_METRICS
from exp_script.evaluate import main

REPO_ROOT = Path(__file__).resolve().parents[1]
EXP_SCRIPT = REPO_ROOT / "exp_script"
NOTEBOOKS = ["script_diffusion_umap.ipynb", "script_static_eval.ipynb", "down_stream_analysis.ipynb",
             "script_random_forest.ipynb"]
# what each notebook's outputs must show: a metric name its table prints, or a PNG it displays
NOTEBOOK_SHOWS = {"script_diffusion_umap.ipynb": "image/png", "script_static_eval.ipynb": "wasserstein_means",
                  "down_stream_analysis.ipynb": "marker_jaccard", "script_random_forest.ipynb": "rf_auc"}
N_TYPES = 4
N_GENES = 240


# ----------------------------------------------------------------------------------------------
# synthetic cells: each type over-expresses its own block of genes

def type_rates(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.5, 1.0, size=N_GENES)
    rates = np.tile(base, (N_TYPES, 1))
    block = N_GENES // (N_TYPES + 1)
    for t in range(N_TYPES):
        rates[t, t * block:(t + 1) * block] *= 10.0
    return rates


def draw_counts(n_cells, seed, rates=None):
    """Poisson counts of ``n_cells`` cells spread evenly over the types; labels as strings."""
    rng = np.random.default_rng(seed)
    rates = type_rates() if rates is None else rates
    types = np.arange(n_cells) % N_TYPES
    depth = rng.uniform(0.6, 1.4, size=(n_cells, 1))
    counts = rng.poisson(rates[types] * depth).astype(np.float32)
    return counts, np.array([f"type_{t}" for t in types])


def log_normalize(counts):
    totals = counts.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    return np.log1p(counts / totals * 1e4).astype(np.float32)


def gene_names(count=N_GENES, prefix="gene"):
    return [f"{prefix}{j}" for j in range(count)]


def write_real(path, counts, labels, genes=None):
    obs = pd.DataFrame({"cell_type1": pd.Categorical(labels)}, index=[f"real{i}" for i in range(len(labels))])
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes or gene_names()))
    adata.write_h5ad(path)
    return path


def write_generated(path, values, labels, genes=None):
    """Like the sampler's output: dense log-normalized X, labels and provenance in ``uns``."""
    obs = pd.DataFrame({"cell_type1": pd.Categorical(labels)},
                       index=[f"generated_{i}" for i in range(len(labels))])
    adata = anndata.AnnData(X=np.asarray(values, dtype=np.float32), obs=obs,
                            var=pd.DataFrame(index=genes or gene_names()))
    adata.uns["cfdiffusion"] = {"checkpoint": "fake.pt", "step": 0, "label_keys": ["cell_type1"]}
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real file (raw counts) and a well-generated file (an independent draw of the same cells);
    the generated file lacks two real genes and has one extra gene."""
    folder = tmp_path_factory.mktemp("evaluation")
    real_counts, real_labels = draw_counts(400, seed=1)
    generated_counts, generated_labels = draw_counts(400, seed=2)
    genes = gene_names()
    generated_genes = genes[2:] + ["not_in_real"]
    generated = np.hstack([log_normalize(generated_counts)[:, 2:], np.ones((400, 1), np.float32)])
    return {
        "real": write_real(folder / "real.h5ad", real_counts, real_labels),
        "generated": write_generated(folder / "generated.h5ad", generated, generated_labels, generated_genes),
        "folder": folder,
    }


# ----------------------------------------------------------------------------------------------
# metrics on known answers

@pytest.fixture(scope="module")
def cells():
    real_counts, real_labels = draw_counts(300, seed=11)
    twin_counts, twin_labels = draw_counts(300, seed=12)
    return log_normalize(real_counts), real_labels, log_normalize(twin_counts), twin_labels


def test_identical_sets_score_perfectly(cells):
    real, _, _, _ = cells
    correlations = m.gene_mean_correlations(real, real)
    assert correlations["scc"] == pytest.approx(1.0)
    assert correlations["pcc"] == pytest.approx(1.0)
    assert m.mean_wasserstein(real, real) == pytest.approx(0.0, abs=1e-9)
    assert m.wasserstein_of_means(real, real) == pytest.approx(0.0, abs=1e-9)


def test_vectorised_wasserstein_matches_scipy():
    rng = np.random.default_rng(0)
    for n, k in ((7, 5), (40, 13), (1, 6), (25, 25)):
        first = rng.poisson(1.5, size=(n, 9)).astype(np.float32)
        second = rng.normal(1.0, 2.0, size=(k, 9)).astype(np.float32)
        expected = [stats.wasserstein_distance(first[:, j], second[:, j]) for j in range(9)]
        np.testing.assert_allclose(m.wasserstein_per_gene(first, second, genes_per_chunk=4), expected, atol=1e-6)


def test_shifted_means_lower_correlation_and_raise_wasserstein(cells):
    real, _, twin, _ = cells
    rng = np.random.default_rng(3)
    shifted = twin.copy()
    shifted[:, rng.permutation(N_GENES)[:N_GENES // 2]] += 1.5
    same, moved = m.gene_mean_correlations(real, twin), m.gene_mean_correlations(real, shifted)
    assert same["scc"] > 0.95 and same["pcc"] > 0.95
    assert moved["scc"] < same["scc"] - 0.2
    assert moved["pcc"] < same["pcc"] - 0.2
    assert m.mean_wasserstein(real, shifted) > 5 * m.mean_wasserstein(real, twin)
    assert m.wasserstein_of_means(real, shifted) > 5 * m.wasserstein_of_means(real, twin)


def test_same_distribution_is_indistinguishable_and_collapse_is_not():
    rng = np.random.default_rng(4)
    centers = rng.normal(0, 4, size=(N_TYPES, 10))
    first = centers[np.arange(300) % N_TYPES] + rng.normal(size=(300, 10))
    second = centers[np.arange(300) % N_TYPES] + rng.normal(size=(300, 10))
    collapsed = np.repeat(second[:1], 300, axis=0)
    is_second = np.r_[np.zeros(300, bool), np.ones(300, bool)]
    gammas = m.rbf_gammas(first, np.random.default_rng(0))

    same = m.two_sample_scores(m.out_of_fold_probabilities(np.vstack([first, second]), is_second,
                                                           m.knn_classifier(5), seed=0), is_second)
    assert 0.4 < same["auc"] < 0.6 and 0.4 < same["accuracy"] < 0.6
    rf_same = m.two_sample_scores(m.out_of_fold_probabilities(np.vstack([first, second]), is_second,
                                                              m.random_forest_classifier(50), seed=0), is_second)
    assert 0.38 < rf_same["auc"] < 0.62

    apart = m.two_sample_scores(m.out_of_fold_probabilities(np.vstack([first, collapsed]), is_second,
                                                            m.knn_classifier(5), seed=0), is_second)
    assert apart["auc"] > 0.95

    mmd_same, mmd_collapsed = m.mmd_rbf(first, second, gammas), m.mmd_rbf(first, collapsed, gammas)
    assert abs(mmd_same) < 0.02
    assert mmd_collapsed > 0.3 and mmd_collapsed > 20 * abs(mmd_same)


def test_ilisi_mixed_versus_separated():
    rng = np.random.default_rng(5)
    first, second = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    sources = np.r_[np.zeros(200, int), np.ones(200, int)]
    lisi, mixed = m.lisi_per_cell(np.vstack([first, second]), sources, n_neighbors=60)
    assert mixed > 0.8
    assert m.scaled_ilisi(lisi) == pytest.approx(mixed, abs=1e-6)
    _, separated = m.lisi_per_cell(np.vstack([first, second + 20.0]), sources, n_neighbors=60)
    assert separated < 0.05


def test_shuffled_labels_lower_celltypist_accuracy_and_marker_overlap(cells):
    real, real_labels, twin, twin_labels = cells
    genes = gene_names()
    shuffled = np.random.default_rng(6).permutation(twin_labels)
    model = m.train_celltypist(real, real_labels, genes, seed=0)
    predicted = m.predict_celltypist(model, twin, genes)
    assert m.label_accuracy(predicted, twin_labels) > 0.9
    assert m.label_accuracy(predicted, shuffled) < 0.5

    groups = sorted(set(real_labels))
    reference = m.marker_genes(real, real_labels, genes, groups, top_n=20)
    faithful = m.marker_genes(twin, twin_labels, genes, groups, top_n=20)
    scrambled = m.marker_genes(twin, shuffled, genes, groups, top_n=20)
    faithful_score = np.mean([m.jaccard(reference[g], faithful[g]) for g in groups])
    scrambled_score = np.mean([m.jaccard(reference[g], scrambled[g]) for g in groups])
    assert faithful_score > 0.6
    assert scrambled_score < faithful_score - 0.3


def test_split_and_subsample_keep_label_proportions():
    labels = np.array(["a"] * 8 + ["b"] * 101 + ["c"] * 3)
    reference, control = evaluation.split_real(labels, seed=0)
    assert sorted(np.r_[reference, control]) == list(range(len(labels)))
    for name, size in (("a", 8), ("b", 101), ("c", 3)):
        assert (labels[reference] == name).sum() == (size + 1) // 2
    chosen = evaluation.stratified_subsample(labels, 56, np.random.default_rng(0))
    assert len(set(chosen)) == 56
    assert (labels[chosen] == "a").sum() == 4 and (labels[chosen] == "c").sum() >= 1


# ----------------------------------------------------------------------------------------------
# the CLI and the whole evaluation

def run_cli(files, out, *extra):
    return main(["--real", str(files["real"]), "--generated", str(files["generated"]), "--label_key", "cell_type1",
                 "--out", str(out), "--progress", "False", *extra])


def test_cli_writes_every_metric_report_and_plots(files, tmp_path):
    out = tmp_path / "report"
    run_cli(files, out)
    result = json.loads((out / "metrics.json").read_text())
    assert result["inputs"]["shared_genes"] == N_GENES - 2
    assert result["inputs"]["genes_only_in_generated"] == 1
    assert result["labels"]["evaluated"] == [f"type_{t}" for t in range(N_TYPES)]
    computed = set(evaluation.METRICS) - set(CONDITION_METRICS)  # condition effects need --condition_key
    for section in ("generated", "real_vs_real", "memorizer", "collapsed"):
        assert set(result[section]["overall"]) == computed
        for label in result["labels"]["evaluated"]:
            assert computed <= set(result[section]["per_label"][label])
        assert all(value is not None for value in result[section]["overall"].values())
    # an independent draw of the same cells scores like the positive control
    generated, control = result["generated"]["overall"], result["real_vs_real"]["overall"]
    assert generated["scc"] > 0.9 and control["scc"] > 0.9
    assert abs(generated["knn_auc"] - 0.5) < 0.15 and abs(control["knn_auc"] - 0.5) < 0.15
    assert generated["celltypist_accuracy"] > 0.9
    for name in ("umap.png", "mean_scatter.png", "per_label_metrics.png", "report.md"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| knn_auc |" in report and "real vs real" in report and "umap.png" in report
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_same_seed_same_metrics(files, tmp_path):
    chosen = ("--metrics", "scc", "knn_auc", "marker_jaccard", "de_lfc_pearson")
    first = run_cli(files, tmp_path / "first", "--plots", "False", "--seed", "3", *chosen)
    second = run_cli(files, tmp_path / "second", "--plots", "False", "--seed", "3", *chosen)
    for section in ("generated", "real_vs_real", "memorizer", "collapsed", "labels", "split"):
        assert first[section] == second[section]


def test_collapsed_generator_is_detected(files, tmp_path):
    counts, labels = draw_counts(400, seed=7)
    collapsed = np.repeat(log_normalize(counts)[:1], 400, axis=0)
    bad = dict(files, generated=write_generated(tmp_path / "collapsed.h5ad", collapsed, labels))
    result = run_cli(bad, tmp_path / "out", "--plots", "False",
                     "--metrics", "scc", "mmd", "knn_auc", "ilisi")
    generated, control = result["generated"]["overall"], result["real_vs_real"]["overall"]
    assert generated["knn_auc"] > 0.9
    assert generated["scc"] < control["scc"] - 0.2
    assert generated["mmd"] > 10 * max(abs(control["mmd"]), 1e-3)
    assert generated["ilisi"] < control["ilisi"] - 0.5


def test_shuffled_generated_labels_are_detected(files, tmp_path):
    counts, labels = draw_counts(400, seed=8)
    shuffled = np.random.default_rng(0).permutation(labels)
    bad = dict(files, generated=write_generated(tmp_path / "shuffled.h5ad", log_normalize(counts), shuffled))
    result = run_cli(bad, tmp_path / "out", "--plots", "False", "--metrics", "celltypist_accuracy", "marker_jaccard")
    generated, control = result["generated"]["overall"], result["real_vs_real"]["overall"]
    assert control["celltypist_accuracy"] > 0.9 and generated["celltypist_accuracy"] < 0.5
    assert generated["marker_jaccard"] < control["marker_jaccard"] - 0.3


def test_small_labels_are_skipped_and_listed(files, tmp_path):
    counts, labels = draw_counts(400, seed=9)
    labels = labels.copy()
    labels[:6] = "rare"
    bad = dict(files, generated=write_generated(tmp_path / "rare.h5ad", log_normalize(counts), labels))
    result = run_cli(bad, tmp_path / "out", "--plots", "False", "--metrics", "scc")
    assert "rare" not in result["labels"]["evaluated"]
    assert result["labels"]["unknown_generated"] == {"rare": 6}


def test_interrupted_run_leaves_no_metrics_file(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_cli(files, out, "--plots", "False", "--metrics", "scc")
    assert (out / "metrics.json").exists()

    def interrupted(results):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "render_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(files, out, "--plots", "False", "--metrics", "scc")
    assert not (out / "metrics.json").exists()


def test_log_normalized_real_data_from_raw_layer(tmp_path):
    """pbmc68k_reduced keeps log-normalized values in .raw (shipped with scanpy, no download)."""
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    real_path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(real_path)
    raw = pbmc.raw.X.toarray() if sp.issparse(pbmc.raw.X) else np.asarray(pbmc.raw.X)
    noisy = np.clip(raw + np.random.default_rng(0).normal(0, 0.2, raw.shape) * (raw > 0), 0, None)
    generated = anndata.AnnData(X=noisy.astype(np.float32),
                                obs=pd.DataFrame({"bulk_labels": pbmc.obs["bulk_labels"].to_numpy()},
                                                 index=[f"g{i}" for i in range(pbmc.n_obs)]),
                                var=pd.DataFrame(index=pbmc.raw.var_names))
    generated_path = tmp_path / "generated.h5ad"
    generated.write_h5ad(generated_path)
    result = main(["--real", str(real_path), "--generated", str(generated_path), "--label_key", "bulk_labels",
                   "--layer", "raw", "--input_is_log", "True", "--out", str(tmp_path / "out"),
                   "--plots", "False", "--progress", "False", "--metrics", "scc", "pcc", "knn_auc"])
    assert result["inputs"]["shared_genes"] == pbmc.raw.n_vars
    assert result["generated"]["overall"]["scc"] > 0.9


@pytest.mark.parametrize("case", ["missing_real", "missing_generated", "unknown_label", "label_not_in_generated",
                                  "no_shared_genes", "counts_as_generated"])
def test_bad_input_is_one_line_and_exit_2(files, tmp_path, capsys, case):
    counts, labels = draw_counts(60, seed=10)
    args = {"real": files["real"], "generated": files["generated"], "label_key": "cell_type1"}
    if case == "missing_real":
        args["real"] = tmp_path / "absent.h5ad"
    elif case == "missing_generated":
        args["generated"] = tmp_path / "absent.h5ad"
    elif case == "unknown_label":
        args["label_key"] = "tissue"
    elif case == "label_not_in_generated":
        adata = anndata.AnnData(X=log_normalize(counts), var=pd.DataFrame(index=gene_names()),
                                obs=pd.DataFrame({"other": labels}, index=[f"g{i}" for i in range(60)]))
        args["generated"] = tmp_path / "no_label.h5ad"
        adata.write_h5ad(args["generated"])
    elif case == "no_shared_genes":
        args["generated"] = write_generated(tmp_path / "other_genes.h5ad", log_normalize(counts), labels,
                                            gene_names(prefix="other"))
    elif case == "counts_as_generated":
        args["generated"] = write_generated(tmp_path / "counts.h5ad", counts * 100, labels)
    with pytest.raises(SystemExit) as exit_info:
        main(["--real", str(args["real"]), "--generated", str(args["generated"]), "--label_key", args["label_key"],
              "--out", str(tmp_path / "out"), "--progress", "False"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message
    assert not (tmp_path / "out" / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# notebooks

def test_notebooks_are_committed_without_outputs():
    for name in NOTEBOOKS:
        notebook = nbformat.read(EXP_SCRIPT / name, as_version=4)
        tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} has outputs"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernel spec that starts this interpreter, put first on JUPYTER_PATH, so the notebooks run in
    the test's environment whatever kernels the user has installed (no ``ipykernel install``)."""
    folder = tmp_path_factory.mktemp("jupyter")
    name = "cfdiffusion-evaluation-test"
    spec = folder / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cfDiffusion tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(folder))
        yield name


def with_parameters(notebook, values):
    """Insert a cell right after the 'parameters' cell that overrides its values (as papermill does)."""
    position = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{key} = {value!r}" for key, value in values.items())
    notebook.cells.insert(position + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return notebook


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(files, kernel_name, tmp_path, name):
    from nbclient import NotebookClient

    notebook = with_parameters(nbformat.read(EXP_SCRIPT / name, as_version=4), {
        "real_path": str(files["real"]), "generated_path": str(files["generated"]), "label_key": "cell_type1",
        "out_dir": str(tmp_path / "out")})
    NotebookClient(notebook, kernel_name=kernel_name, timeout=300,
                   resources={"metadata": {"path": str(EXP_SCRIPT)}}).execute()
    shown = json.dumps([cell.outputs for cell in notebook.cells if cell.cell_type == "code"])
    assert NOTEBOOK_SHOWS[name] in shown, f"{name}'s outputs lack {NOTEBOOK_SHOWS[name]}"
    assert list((tmp_path / "out").glob("*.png")) or name == "down_stream_analysis.ipynb"


def test_marker_overlap_is_withheld_with_too_few_candidate_genes(files, tmp_path, capsys):
    result = run_cli(files, tmp_path / "out", "--plots", "False", "--metrics", "scc", "marker_jaccard",
                     "--marker_genes", "60")
    for section in ("generated", "real_vs_real"):
        assert "marker_jaccard" not in result[section]["overall"] and "scc" in result[section]["overall"]
    assert any(w.startswith("marker_jaccard withheld: 60 candidate genes") for w in result["warnings"])
    assert "marker_jaccard withheld" in capsys.readouterr().err
    assert "marker_jaccard withheld" in (tmp_path / "out" / "report.md").read_text()
