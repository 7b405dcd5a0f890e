"""The label classifier: multinomial logistic regression (scikit-learn) on standardized features, the one
logistic-regression pipeline of the evaluation.

:func:`logistic_regression` is that pipeline; its users put their own feature steps in front of it:

* the guidance tools (guidance_sweep.py, unseen_combination.py): fitted on real cells only,
  log1p(normalize_total 1e4) expression -> the real cells' most variable genes -> standardize -> PCA ->
  logistic regression (:func:`label_classifier`). It answers "which label would a model of the real data
  give this cell?" for generated cells (label accuracy, donor calls) and, out of fold, for the real cells
  themselves (the reference figure);
* the usefulness checks (usefulness.py): the evaluation's feature space -> standardize -> logistic
  regression.
"""
import warnings

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from guided_diffusion.core.errors import UsageError


def logistic_regression(*steps, seed=0, max_iter=2000):
    """An unfitted pipeline: ``steps`` (feature transforms, first to last) -> logistic regression."""
    return make_pipeline(*steps, LogisticRegression(max_iter=max_iter, C=1.0, random_state=seed))


def fit_quietly(pipeline, features, labels):
    """``pipeline`` fitted without scikit-learn's convergence warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipeline.fit(features, labels)


def variable_genes(expression, n_genes):
    """Indices of the ``n_genes`` genes with the highest variance of log-normalized expression."""
    variance = expression.var(axis=0)
    return np.sort(np.argsort(variance)[::-1][:min(n_genes, expression.shape[1])])


def label_classifier(expression, n_hvg=2000, n_pcs=50, seed=0):
    """An unfitted pipeline: the real cells' most variable genes -> standardize -> PCA -> logistic regression."""
    columns = variable_genes(expression, n_hvg)
    n_components = max(1, min(n_pcs, len(columns), expression.shape[0] - 1))
    return logistic_regression(FunctionTransformer(lambda values: values[:, columns]), StandardScaler(),
                               PCA(n_components=n_components, random_state=seed), seed=seed)


def fit_label_classifier(expression, labels, n_hvg=2000, n_pcs=50, seed=0):
    if len(set(labels)) < 2:
        raise UsageError(f"a label classifier needs at least two labels among the real cells, got {set(labels)}")
    return label_classifier(expression, n_hvg, n_pcs, seed).fit(expression, labels)


def out_of_fold_labels(expression, labels, n_hvg=2000, n_pcs=50, seed=0, folds=5):
    """Each real cell's label predicted by a classifier fitted without its fold (stratified)."""
    labels = np.asarray(labels)
    smallest = pd.Series(labels).value_counts().min()
    folds = int(max(2, min(folds, smallest)))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(label_classifier(expression, n_hvg, n_pcs, seed), expression, labels, cv=splitter)
