"""Reading real and generated cells for the guidance tools (guidance_sweep.py, unseen_combination.py):
log1p(normalize_total 1e4) dense expression with the label columns as strings, and the generated
cells' genes put in the real cells' order."""
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from guided_diffusion.data import read_h5ad

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
