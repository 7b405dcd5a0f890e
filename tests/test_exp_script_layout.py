"""exp_script's layout: command-line scripts at the top, their shared library in exp_script.evaluation. The
scripts import the library, never one another; the library imports no script; a measurement shared by
several scripts (the kNN AUC, the logistic-regression label classifier) has one definition."""
import ast
import pathlib
import re

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from exp_script.evaluation import metrics, usefulness
from test_imports import ROOT, import_graph

EXP_SCRIPT = ROOT / "exp_script"
LIBRARY = EXP_SCRIPT / "evaluation"
SCRIPTS = ("evaluate", "split", "augment", "gap_analysis", "guidance_sweep", "unseen_combination", "reconstruct",
           "choose_autoencoder")


def top_level_modules():
    return {f"exp_script.{path.stem}" for path in EXP_SCRIPT.glob("*.py") if path.stem != "__init__"}


def test_the_documented_scripts_keep_their_paths():
    assert {f"exp_script.{name}" for name in SCRIPTS} | {"exp_script.api"} == top_level_modules()


def test_scripts_import_the_library_not_one_another():
    graph = import_graph()
    scripts = top_level_modules() - {"exp_script.api"}
    crossing = {script: sorted(graph[script] & scripts) for script in scripts if graph[script] & scripts}
    assert crossing == {}


def test_the_library_imports_no_script_and_not_the_api():
    graph = import_graph()
    upward = {module: sorted(target for target in targets if target in top_level_modules())
              for module, targets in graph.items() if module.startswith("exp_script.evaluation")}
    assert {module: targets for module, targets in upward.items() if targets} == {}


def definitions(pattern):
    """Files of exp_script and benchmarks whose source matches ``pattern``."""
    files = sorted(EXP_SCRIPT.rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    return [str(path.relative_to(ROOT)) for path in files if re.search(pattern, path.read_text())]


def test_one_knn_auc_and_one_logistic_regression():
    assert definitions(r"(?m)^\s*def knn_auc\(") == ["exp_script/evaluation/metrics.py"]
    assert definitions(r"LogisticRegression\(") == ["exp_script/evaluation/label_classifier.py"]


def test_the_package_table_names_every_module():
    docstring = ast.get_docstring(ast.parse((LIBRARY / "__init__.py").read_text()))
    listed = set(re.findall(r"(?m)^([a-z_]+)\s{2,}", docstring))
    assert listed - {"module"} == {path.stem for path in LIBRARY.glob("*.py") if path.stem != "__init__"}


def test_knn_auc_tells_shifted_cells_apart():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 5))
    assert abs(metrics.knn_auc(reference, rng.normal(size=(200, 5)), seed=0) - 0.5) < 0.1
    assert metrics.knn_auc(reference, rng.normal(size=(200, 5)) + 3.0, seed=0) > 0.95


@pytest.mark.parametrize("seed", [0, 3])
def test_usefulness_classifier_is_standardize_then_logistic_regression(seed):
    rng = np.random.default_rng(seed)
    features, labels = rng.normal(size=(150, 12)), rng.integers(0, 4, 150).astype(str)
    features[:, 0] += 3 * (labels == "1")
    queries = rng.normal(size=(80, 12))
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(max_iter=1000, random_state=seed).fit(scaler.transform(features), labels)
    expected = model.predict(scaler.transform(queries))
    assert (usefulness.fit_classifier(features, labels, seed)(queries) == expected).all()
