"""Build ``dataset/pbmc3k.h5ad`` from the PBMC 3k counts and Seurat-tutorial labels (see dataset/README.md).

The source is ``data/pbmc3k.RData`` of the R package singlet (github.com/zdebruine/singlet, commit
7ce199e2c77a4d18a62defcff513b0d5b7a4ce8d): the SeuratData "pbmc3k" object's raw UMI counts (10x Genomics
"3k PBMCs from a Healthy Donor", 13,714 genes x 2,700 cells, genes detected in >= 3 cells) stored as the
slots of a dgCMatrix with run-length-encoded values, plus ``cell_type``, the labels of Seurat's guided
clustering tutorial (NA for the 62 cells its QC removes). Reading the .RData needs the pure-Python
package ``rdata`` (``pip install rdata``), used only by this script.

    python dataset/make_pbmc3k.py --source /path/to/pbmc3k.RData --out dataset/pbmc3k.h5ad

Steps: drop the cells without a label; drop labels with fewer than ``--min_label_cells`` cells (none at
the default 10); subsample to ``--max_cells`` stratified by label with ``--seed`` (no-op at the default
4,000: 2,638 cells remain); keep genes detected in >= ``--min_cells_per_gene`` kept cells; write X as a
sparse CSR float32 matrix of the raw integer counts, gzip-compressed.
"""
import argparse
import hashlib
import pathlib

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

SOURCE_SHA256 = "db273d05bc79d887b7072aff54272b2d29183b1c18c10edd36523f1d71085bd3"


def read_source(path):
    """(cells x genes CSR of counts, barcodes, genes, labels) from singlet's pbmc3k.RData."""
    try:
        import rdata
    except ImportError as error:
        raise SystemExit("reading the .RData needs the package 'rdata': pip install rdata") from error
    obj = rdata.read_rda(path)["pbmc3k"]
    n_genes, n_cells = (int(v) for v in obj["Dim"])
    run = obj["x"]  # an R "rle": values repeated lengths times
    values = np.repeat(np.asarray(run["values"]), np.asarray(run["lengths"]))
    indices, indptr = np.asarray(obj["i"]), np.asarray(obj["p"])
    if values.shape != indices.shape or indptr.shape != (n_cells + 1,) or indptr[-1] != len(values):
        raise SystemExit("the dgCMatrix slots do not agree; not singlet's pbmc3k.RData?")
    if not np.issubdtype(values.dtype, np.integer) and not np.array_equal(values, np.round(values)):
        raise SystemExit("the counts are not integers")
    if values.min() <= 0:
        raise SystemExit("a stored count is <= 0")
    counts = sp.csc_matrix((values.astype(np.float32), indices, indptr), shape=(n_genes, n_cells))
    genes, barcodes = (np.asarray(names).astype(str) for names in obj["Dimnames"])
    labels = pd.Series(pd.Categorical(obj["cell_type"]), index=barcodes).astype(object)
    return counts.T.tocsr(), barcodes, genes, labels


def stratified_subsample(labels, max_cells, seed):
    """Sorted row positions of at most ``max_cells`` cells, each label keeping its share (largest
    remainders get the leftover cells)."""
    if len(labels) <= max_cells:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    counts = labels.value_counts().sort_index()
    exact = counts / counts.sum() * max_cells
    quota = np.floor(exact).astype(int)
    leftover = max_cells - quota.sum()
    quota[(exact - quota).sort_values(ascending=False, kind="stable").index[:leftover]] += 1
    keep = [rng.choice(np.flatnonzero(labels.to_numpy() == label), size=n, replace=False)
            for label, n in quota.items()]
    return np.sort(np.concatenate(keep))


def make_unique(names):
    """anndata's var_names_make_unique: later duplicates get -1, -2, ..."""
    seen, out = set(names), []
    counts = {}
    for name in names:
        if name in counts:
            counts[name] += 1
            new = f"{name}-{counts[name]}"
            while new in seen:
                counts[name] += 1
                new = f"{name}-{counts[name]}"
            seen.add(new)
            out.append(new)
        else:
            counts[name] = 0
            out.append(name)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="singlet's data/pbmc3k.RData")
    parser.add_argument("--out", default="dataset/pbmc3k.h5ad")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_cells", type=int, default=4000)
    parser.add_argument("--min_label_cells", type=int, default=10,
                        help="drop labels with fewer cells than this (after dropping unlabelled cells)")
    parser.add_argument("--min_cells_per_gene", type=int, default=1,
                        help="keep genes detected (count > 0) in at least this many kept cells")
    args = parser.parse_args(argv)

    digest = hashlib.sha256(pathlib.Path(args.source).read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        print(f"warning: {args.source} has sha256 {digest}, not the documented {SOURCE_SHA256}")
    X, barcodes, genes, labels = read_source(args.source)
    print(f"source: {X.shape[0]} cells x {X.shape[1]} genes, {X.nnz} non-zeros, "
          f"{labels.isna().sum()} cells without a label")

    keep = labels.notna().to_numpy()
    sizes = labels[keep].value_counts()
    small = sizes.index[sizes < args.min_label_cells]
    if len(small):
        print(f"dropping labels with < {args.min_label_cells} cells: {', '.join(map(str, small))}")
    keep &= ~labels.isin(small).to_numpy()
    rows = np.flatnonzero(keep)
    rows = rows[stratified_subsample(labels.iloc[rows].reset_index(drop=True), args.max_cells, args.seed)]
    X, labels = X[rows], labels.iloc[rows]

    detected = np.asarray((X > 0).sum(axis=0)).ravel()
    columns = np.flatnonzero(detected >= args.min_cells_per_gene)
    X = X[:, columns].tocsr()
    X.sort_indices()

    order = labels.value_counts().index.tolist()  # categories by size, largest first
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels.to_numpy(), categories=order)},
                       index=pd.Index(barcodes[rows], name=None))
    for column, value in (("dataset_name", "pbmc3k"), ("platform", "10x Chromium (v1)"),
                          ("organism", "Homo sapiens"), ("organ", "blood")):
        obs[column] = pd.Categorical([value] * len(obs))
    var = pd.DataFrame(index=pd.Index(make_unique(list(genes[columns])), name=None))
    adata = anndata.AnnData(X=X.astype(np.float32), obs=obs, var=var)
    adata.uns["source"] = {
        "data": "10x Genomics, 3k PBMCs from a Healthy Donor (CC BY 4.0)",
        "labels": "Seurat guided clustering tutorial (SeuratData pbmc3k seurat_annotations)",
        "file": "github.com/zdebruine/singlet data/pbmc3k.RData @ 7ce199e2c77a4d18a62defcff513b0d5b7a4ce8d",
        "sha256": digest,
        "seed": args.seed, "max_cells": args.max_cells, "min_label_cells": args.min_label_cells,
        "min_cells_per_gene": args.min_cells_per_gene,
    }
    adata.write_h5ad(args.out, compression="gzip")
    print(f"wrote {args.out}: {adata.n_obs} cells x {adata.n_vars} genes")
    print(adata.obs["cell_type"].value_counts().to_string())


if __name__ == "__main__":
    main()
