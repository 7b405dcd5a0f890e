"""Tiny synthetic AnnData shared by the tests: clustered counts with two label keys.

Imported as ``synthetic`` (pytest puts tests/ on sys.path); not ``tests.*``, because a dependency
(plottable) installs a top-level ``tests`` package that would shadow this folder.
"""
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = REPO_ROOT / "dataset" / "baron_human.h5ad"


def make_counts_adata(n_cells=150, n_genes=40, n_types=3, n_donors=2, seed=0):
    """Raw integer counts in sparse CSR; each cell type over-expresses its own block of genes."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, size=n_cells)
    donors = rng.integers(0, n_donors, size=n_cells)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    rates = np.tile(base, (n_cells, 1))
    block = max(n_genes // (n_types + 1), 1)
    for t in range(n_types):
        rates[types == t, t * block:(t + 1) * block] *= 8.0
    rates *= rng.uniform(0.5, 1.5, size=(n_cells, 1))
    counts = rng.poisson(rates).astype(np.float32)
    counts[0, :] = 0.0  # one empty cell: normalization must not divide by zero
    obs = pd.DataFrame({
        "cell_type1": pd.Categorical([f"type_{t}" for t in types]),
        "donor": pd.Categorical([f"donor{d}" for d in donors]),
    }, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def small_count_decoder(n_cells, total, seed=0):
    """A small untrained count autoencoder (300 genes, latent 8) in eval mode, ``n_cells`` unit-norm latents
    and a library size of ``total`` for each: the inputs of ``VAE.sample_counts`` tests."""
    import torch

    from VAE.VAE_model import VAE

    torch.manual_seed(seed)
    model = VAE(num_genes=300, latent_dim=8, hidden_dims=(16, 16, 16), loss_ae="nb").eval()
    latent = torch.nn.functional.normalize(torch.randn(n_cells, 8), dim=1)
    return model, latent, torch.full((n_cells,), float(total))
