r"""Convert the CITE-seq cord-blood (CBMC) counts that scDCC ships into an h5ad for the benchmarks.

    python benchmarks/prepare_cbmc.py --source CITE_CBMC_counts_top2000.h5 --out checkpoint/cbmc/cbmc.h5ad

The source file is ``data/CITE_PBMC/CITE_CBMC_counts_top2000.h5`` of https://github.com/ttgump/scDCC (Apache-2.0;
Tian et al., Nat. Commun. 12:1873, 2021), made from the cord-blood CITE-seq data of Stoeckius et al., Nat. Methods
14:865, 2017 (GEO GSE100866): 8,617 cells x the 2,000 most variable genes, raw UMI counts in ``X``, 15 cluster
labels in ``Y``. It carries no gene names (the genes are named gene0000...) and its labels are cluster numbers
(written cluster01...cluster15 to ``obs['cell_type']``). It is not bundled: a third dataset for measurements that
need more cells than the bundled ones have (docs/fidelity.md, "What the decoder bound depends on").
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def read_source(path):
    """(counts, labels) of the scDCC file; a file without them, or with counts that are not whole numbers, is a
    one-line error."""
    import h5py

    try:
        with h5py.File(path, "r") as source:
            if "X" not in source or "Y" not in source:
                raise SystemExit(f"error: {path} has no X (counts) and Y (labels) arrays: not scDCC's CBMC file")
            counts, labels = np.asarray(source["X"], dtype=np.float64), np.asarray(source["Y"])
    except OSError as error:
        raise SystemExit(f"error: cannot read {path} as HDF5 ({error})") from None
    if counts.ndim != 2 or len(labels) != counts.shape[0]:
        raise SystemExit(f"error: {path}: X is {counts.shape} but Y has {len(labels)} labels")
    if (counts < 0).any() or not np.array_equal(counts, np.round(counts)):
        raise SystemExit(f"error: {path}: X holds values that are not counts (negative or fractional)")
    return counts, labels


def to_anndata(counts, labels):
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    names = [f"cluster{int(label):02d}" for label in labels]
    obs = pd.DataFrame({"cell_type": pd.Categorical(names)}, index=[f"cell{i}" for i in range(len(names))])
    var = pd.DataFrame(index=[f"gene{j:04d}" for j in range(counts.shape[1])])
    return anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="scDCC's CITE_CBMC_counts_top2000.h5")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not os.path.isfile(args.source):
        raise SystemExit(f"error: --source {args.source} does not exist")
    counts, labels = read_source(args.source)
    from guided_diffusion.sampling.writer import write_h5ad

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_h5ad(args.out, to_anndata(counts, labels))
    print(f"{args.out}: {counts.shape[0]} cells x {counts.shape[1]} genes, {len(set(labels.tolist()))} labels")


if __name__ == "__main__":
    main()
