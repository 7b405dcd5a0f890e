"""Differential-expression fidelity: do generated cells reproduce the log-fold changes a DE analysis finds?

scanpy's ``rank_genes_groups`` (t-test by default, on log-normalized values, genes matched by name) is run
on the real reference cells and on the compared cells, each label against the rest (one-vs-rest), and,
with condition keys, one condition value against another within one label (e.g. donor A vs donor B within
beta cells). Per comparison:

* ``lfc_pearson`` / ``lfc_spearman``: correlation of the real and compared log2 fold changes (pseudocount
  1 on the normalized scale, see :func:`rank_genes`) over the union of each side's top ``TOP_GENES`` genes
  (ranked by |score|, both directions);
* ``top50_precision``: share of the compared side's top ``PRECISION_GENES`` up-regulated genes that are
  among the real side's;
* ``sign_agreement``: share of the union genes whose fold change has the same sign on both sides.
"""
import warnings

import anndata
import numpy as np
import pandas as pd
from scipy import stats

TOP_GENES = 100
PRECISION_GENES = 50
CONDITION_MIN_CELLS = 10  # a within-type condition pair needs this many cells per side, on both sides


def rank_genes(expression, groups, genes, group_names, reference="rest", method="t-test"):
    """{group: DataFrame(gene -> score, lfc)}: scanpy's rank_genes_groups scores over all genes, and
    log2 fold changes with a pseudocount of 1 on the normalized scale (as Seurat's avg_log2FC):
    log2(mean(expm1(x_group)) + 1) - log2(mean(expm1(x_other)) + 1). scanpy's own fold change adds
    1e-9 instead, so a gene absent from a small group gets about -30 and dominates a correlation."""
    import scanpy as sc

    expression = np.asarray(expression, dtype=np.float32)
    groups = np.asarray(groups, dtype=str)
    obs = pd.DataFrame({"group": pd.Categorical(groups)}, index=[f"cell{i}" for i in range(len(groups))])
    adata = anndata.AnnData(X=expression, obs=obs, var=pd.DataFrame(index=list(genes)))
    adata.uns["log1p"] = {"base": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(adata, "group", groups=list(group_names), reference=reference, method=method,
                                n_genes=adata.n_vars, pts=False)
    result = adata.uns["rank_genes_groups"]
    linear = np.expm1(expression.astype(np.float64))
    tables = {}
    for group in group_names:
        inside = groups == group
        other = ~inside if reference == "rest" else groups == reference
        lfc = np.log2(linear[inside].mean(axis=0) + 1.0) - np.log2(linear[other].mean(axis=0) + 1.0)
        scores = pd.Series(np.asarray(result["scores"][group], dtype=np.float64),
                           index=np.asarray(result["names"][group], dtype=str))
        table = pd.DataFrame({"score": scores.reindex(list(genes)).to_numpy(), "lfc": lfc}, index=list(genes))
        tables[group] = table.replace([np.inf, -np.inf], np.nan).fillna(0.0)
    return tables


def _top(table, count):
    return list(table["score"].abs().sort_values(ascending=False, kind="stable").index[:count])


def _top_up(table, count):
    return list(table["score"].sort_values(ascending=False, kind="stable").index[:count])


def compare_tables(real, compared):
    """The four DE-fidelity figures of one comparison (real and compared rank tables)."""
    union = list(dict.fromkeys(_top(real, TOP_GENES) + _top(compared, TOP_GENES)))
    real_lfc = real["lfc"].reindex(union).to_numpy()
    compared_lfc = compared["lfc"].reindex(union).to_numpy()
    if np.ptp(real_lfc) == 0 or np.ptp(compared_lfc) == 0:
        pearson = spearman = float("nan")
    else:
        pearson = float(stats.pearsonr(real_lfc, compared_lfc).statistic)
        spearman = float(stats.spearmanr(real_lfc, compared_lfc).statistic)
    real_top = set(_top_up(real, PRECISION_GENES))
    precision = float(len(real_top & set(_top_up(compared, PRECISION_GENES))) / PRECISION_GENES)
    agreement = float(np.mean(np.sign(real_lfc) == np.sign(compared_lfc))) if union else float("nan")
    return {"lfc_pearson": pearson, "lfc_spearman": spearman, "top50_precision": precision,
            "sign_agreement": agreement}


def one_vs_rest(reference_x, reference_labels, compared_x, compared_labels, genes, labels, method="t-test"):
    """Per label: DE-fidelity figures, plus both sides' fold changes for the plots."""
    labels = [label for label in labels if label in set(compared_labels) and label in set(reference_labels)]
    if len(labels) < 2 or len(set(compared_labels)) < 2:
        return {}, {}
    real = rank_genes(reference_x, reference_labels, genes, labels, method=method)
    compared = rank_genes(compared_x, compared_labels, genes, labels, method=method)
    figures, fold_changes = {}, {}
    for label in labels:
        figures[label] = compare_tables(real[label], compared[label])
        union = list(dict.fromkeys(_top(real[label], TOP_GENES) + _top(compared[label], TOP_GENES)))
        fold_changes[label] = (real[label]["lfc"].reindex(union).to_numpy(),
                               compared[label]["lfc"].reindex(union).to_numpy())
    return figures, fold_changes


def condition_pairs(reference_labels, reference_conditions, compared_labels, compared_conditions, labels,
                    min_cells=CONDITION_MIN_CELLS):
    """(label, first, second) for every condition pair within a label with ``min_cells`` on each side."""
    pairs = []
    for label in labels:
        in_reference, in_compared = reference_labels == label, compared_labels == label
        values = sorted(set(reference_conditions[in_reference]) & set(compared_conditions[in_compared]))
        enough = [value for value in values
                  if (reference_conditions[in_reference] == value).sum() >= min_cells
                  and (compared_conditions[in_compared] == value).sum() >= min_cells]
        pairs += [(label, first, second) for i, first in enumerate(enough) for second in enough[i + 1:]]
    return pairs


def within_label_conditions(reference_x, reference_labels, reference_conditions, compared_x, compared_labels,
                            compared_conditions, genes, labels, min_cells=CONDITION_MIN_CELLS, method="t-test"):
    """Per (label, condition pair): DE-fidelity figures of the condition effect within that label."""
    figures = {}
    for label, first, second in condition_pairs(reference_labels, reference_conditions, compared_labels,
                                                compared_conditions, labels, min_cells):
        sides = []
        for x, label_column, conditions in ((reference_x, reference_labels, reference_conditions),
                                            (compared_x, compared_labels, compared_conditions)):
            rows = (label_column == label) & np.isin(conditions, [first, second])
            sides.append(rank_genes(x[rows], conditions[rows], genes, [first], reference=second,
                                    method=method)[first])
        figures[f"{label}: {first} vs {second}"] = compare_tables(*sides)
    return figures


def median_of(figures, name):
    values = [item[name] for item in figures.values() if np.isfinite(item.get(name, np.nan))]
    return float(np.median(values)) if values else float("nan")
