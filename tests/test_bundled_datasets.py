"""The real datasets shipped under dataset/ are what dataset/README.md says they are: raw integer counts in
a sparse matrix, the documented label key and number of labels, unique gene names, and a README section
that names the file and its licence."""
import pathlib
import re

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

DATASET_DIR = pathlib.Path(__file__).resolve().parents[1] / "dataset"

# file: (label key to pass as --label_key, number of labels, cells, genes, licence as the README words it)
BUNDLED = {
    "baron_human.h5ad": ("cell_type1", 14, 2142, 20125, "no restrictions on the use or distribution of GEO data"),
    "pbmc3k.h5ad": ("cell_type", 9, 2638, 13713, "CC BY 4.0"),
}


def readme_section(name):
    """The README section (from one "# " heading to the next) whose heading line is followed by ``name``."""
    text = (DATASET_DIR / "README.md").read_text()
    for section in re.split(r"(?m)^(?=# )", text):
        if f"`{name}`" in section:
            return section
    return ""


@pytest.fixture(scope="module", params=sorted(BUNDLED))
def bundled(request):
    path = DATASET_DIR / request.param
    assert path.exists(), f"{path} is missing"
    return request.param, anndata.read_h5ad(path)


def test_counts_are_sparse_non_negative_integers(bundled):
    name, adata = bundled
    assert sp.issparse(adata.X) and adata.X.format == "csr", name
    assert adata.X.dtype == np.float32, name
    data = adata.X.data
    assert data.size > 0 and data.min() >= 0, name
    assert np.array_equal(data, np.round(data)), f"{name}: X is not integer counts"
    assert (adata.X.sum(axis=1) > 0).all(), f"{name}: a cell has no counts"


def test_documented_shape_labels_and_unique_genes(bundled):
    name, adata = bundled
    key, n_labels, n_cells, n_genes, _ = BUNDLED[name]
    assert adata.shape == (n_cells, n_genes), name
    assert key in adata.obs.columns, f"{name}: no obs column {key!r}"
    labels = adata.obs[key]
    assert labels.notna().all(), f"{name}: unlabelled cells"
    assert labels.nunique() == n_labels, name
    assert adata.var_names.is_unique, f"{name}: duplicate gene names"
    assert all(isinstance(gene, str) and gene for gene in adata.var_names[:100]), name


def test_readme_documents_file_licence_and_label_key(bundled):
    name, adata = bundled
    key, n_labels, _, _, licence = BUNDLED[name]
    section = readme_section(name)
    assert section, f"dataset/README.md has no section for {name}"
    assert "Licence" in section and licence in section, f"{name}: the README does not state its licence"
    assert f"`{key}`" in section and f"{n_labels} cell types" in section, name
    counts = adata.obs[key].value_counts()
    for label, n in counts.items():  # the per-label counts the README lists
        assert f"{label} {n:,}" in section, f"{name}: README lacks '{label} {n:,}'"
