"""Reading real and generated cells for the guidance tools, and the label classifier they share.

The classifier is fitted on real cells only: log1p(normalize_total 1e4) expression, the most variable
genes of the real cells, PCA, then multinomial logistic regression (scikit-learn). It answers "which
label would a model of the real data give this cell?" for generated cells (label accuracy, donor calls)
and, out of fold, for the real cells themselves (the reference figure).
"""
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import read_h5ad
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import TARGET_SUM


def read_cells(path, keys, input_is_log=False):
    """(log-normalized dense float32 expression, gene names, obs with ``keys`` as strings) of an h5ad."""
    try:
        adata = read_h5ad(str(path))
    except FileNotFoundError:
        raise UsageError(f"data file not found: {path}") from None
    missing = [key for key in keys if key not in adata.obs.columns]
    if missing:
        raise UsageError(f"{path} has no obs column {missing[0]!r}; columns: {', '.join(map(str, adata.obs.columns))}")
    if adata.n_obs == 0:
        raise UsageError(f"{path} has zero cells")
    if not input_is_log:
        adata.X = adata.X.astype(np.float32)
        sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
        sc.pp.log1p(adata)
    values = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    obs = pd.DataFrame({key: adata.obs[key].astype(str).where(adata.obs[key].notna(), None) for key in keys},
                       index=adata.obs_names)
    return values.astype(np.float32, copy=False), list(map(str, adata.var_names)), obs


def generated_cells(path, keys):
    """The sampler's output: X is already log-normalized."""
    return read_cells(path, keys, input_is_log=True)


def align_to(genes, values, other_genes):
    """``values`` (cells x ``genes``) with its columns reordered to ``other_genes``; refuses missing genes."""
    position = {gene: j for j, gene in enumerate(genes)}
    missing = [gene for gene in other_genes if gene not in position]
    if missing:
        raise UsageError(f"{len(missing)} genes of the real cells are missing from the generated ones (e.g. "
                         f"{missing[0]}); sample from a model trained on the same genes")
    return values[:, [position[gene] for gene in other_genes]]


def variable_genes(expression, n_genes):
    """Indices of the ``n_genes`` genes with the highest variance of log-normalized expression."""
    variance = expression.var(axis=0)
    return np.sort(np.argsort(variance)[::-1][:min(n_genes, expression.shape[1])])


def label_classifier(expression, n_hvg=2000, n_pcs=50, seed=0):
    """An unfitted pipeline: the real cells' most variable genes -> standardize -> PCA -> logistic regression."""
    columns = variable_genes(expression, n_hvg)
    n_components = max(1, min(n_pcs, len(columns), expression.shape[0] - 1))
    return make_pipeline(FunctionTransformer(lambda values: values[:, columns]), StandardScaler(),
                         PCA(n_components=n_components, random_state=seed),
                         LogisticRegression(max_iter=2000, C=1.0, random_state=seed))


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
