"""The most variable genes of log-normalized expression: scanpy's Seurat-flavour normalized dispersion, one
ranking shared by the autoencoder's ``--encoder_genes`` and the evaluation's feature space."""
import warnings

import anndata
import numpy as np
import pandas as pd


def rank_variable_genes(expression, genes=None):
    """Gene indices (columns of ``expression``, cells x genes, log-normalized) ordered from most to least
    variable by scanpy's Seurat-flavour normalized dispersion; ties and genes without a dispersion (last) by
    mean expression, higher first. ``genes``: the column names (only labels the temporary AnnData)."""
    import scanpy as sc

    values = np.asarray(expression, dtype=np.float32)
    names = [f"gene{j}" for j in range(values.shape[1])] if genes is None else list(map(str, genes))
    adata = anndata.AnnData(X=values, obs=pd.DataFrame(index=[f"cell{i}" for i in range(values.shape[0])]),
                            var=pd.DataFrame(index=names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = sc.pp.highly_variable_genes(adata, flavor="seurat", inplace=False)
    dispersion = np.nan_to_num(table["dispersions_norm"].to_numpy(dtype=np.float64), nan=-np.inf)
    means = table["means"].to_numpy(dtype=np.float64)
    return np.lexsort((-means, -dispersion))
