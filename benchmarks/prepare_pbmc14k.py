r"""Convert the sorted-PBMC cells that scMINER ships into a raw-count h5ad for the benchmarks.

    python benchmarks/prepare_pbmc14k.py --source pbmc14k_expression.eset.rda --out checkpoint/pbmc14k/pbmc14k.h5ad

The source file is ``data/pbmc14k_expression.eset.rda`` of https://github.com/jyyulab/scMINER (Apache-2.0): 3,500
of the PBMC14k cells (500 of each of 7 sorted types: B, CD4TCM, CD4TN, CD4Treg, CD8TN, Monocyte, NK) x 8,846 genes,
stored as log2(counts per million + 1) of the kept genes in a Biobase ``SparseExpressionSet``. PBMC14k is a subset
of the down-sampled sorted PBMCs of Abdelaal et al. (Genome Biol. 20:194, 2019; zenodo record 3357167), made from
the FACS-sorted PBMCs of Zheng et al. (Nat. Commun. 8:14049, 2017; 10x Genomics, GemCode v1 chemistry, as PBMC 3k).
The counts are recovered exactly: in every cell the smallest stored value is one count, which gives the cell's
total; every recovered value is checked to be a whole number and every cell's values to sum to a million per
million (a cell whose counts all shared a factor would come back divided by it; every PBMC14k cell has genes
with one count). Reading the .rda needs the package ``rdata`` (``pip install rdata``), used only by this script. Not
bundled: the cells an autoencoder can be pretrained on before it is trained on PBMC 3k (docs/fidelity.md,
"Pretraining on a compatible atlas").
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OBJECT = "pbmc14k_expression.eset"


def read_source(path):
    """(log2 CPM + 1 as a genes x cells CSC matrix, gene names, cell names, obs data frame) of scMINER's .rda."""
    try:
        import rdata
    except ImportError:
        raise SystemExit("error: reading the .rda needs the package 'rdata': pip install rdata") from None
    import warnings
    import scipy.sparse as sp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns about every R class it has no constructor for
            eset = rdata.read_rda(path)[OBJECT]
        exprs = eset.assayData.maps[0]["exprs"]
        obs = eset.phenoData.data
        genes, cells = (np.asarray(names, dtype=str) for names in exprs.Dimnames)
        matrix = sp.csc_matrix((np.asarray(exprs.x, dtype=np.float64), exprs.i, exprs.p), shape=tuple(exprs.Dim))
    except (KeyError, AttributeError, IndexError, TypeError, ValueError) as error:
        raise SystemExit(f"error: {path} is not scMINER's {OBJECT} ({type(error).__name__}: {error})") from None
    except Exception as error:  # the parser's own errors: not an R data file at all
        raise SystemExit(f"error: cannot read {path} as R data ({type(error).__name__}: {error})") from None
    if list(obs.index) != list(cells):
        raise SystemExit(f"error: {path}: the phenotype rows do not match the expression matrix's cells")
    for column in ("trueLabel", "trueLabel_full"):
        if column not in obs.columns:
            raise SystemExit(f"error: {path} has no {column!r} column: not scMINER's {OBJECT}")
    return matrix, genes, cells, obs


def counts_from_log_cpm(log_cpm, tolerance=1e-3):
    """Raw counts (cells x genes, CSR float32) from log2(CPM + 1) (genes x cells, CSC): each cell's smallest
    stored value is taken as one count. A cell whose values are not a million per million, or whose recovered
    counts are not whole numbers, is a one-line error (its smallest count was not 1, or the input is not log2 CPM)."""
    import scipy.sparse as sp

    log_cpm = sp.csc_matrix(log_cpm)
    cpm = log_cpm.copy()
    cpm.data = np.exp2(cpm.data) - 1.0
    counts = cpm.copy()
    for cell in range(cpm.shape[1]):
        start, stop = cpm.indptr[cell], cpm.indptr[cell + 1]
        values = cpm.data[start:stop]
        if not len(values):
            raise SystemExit(f"error: cell {cell} has no counts")
        if abs(values.sum() - 1e6) > 1e6 * tolerance:
            raise SystemExit(f"error: cell {cell}'s values sum to {values.sum():.1f} per million, not 1e6: "
                             f"not log2(CPM + 1)")
        recovered = values / values.min()
        if np.abs(recovered - np.round(recovered)).max() > 10 * tolerance:
            raise SystemExit(f"error: cell {cell}'s counts are not whole numbers when its smallest value is one "
                             f"count")
        counts.data[start:stop] = np.round(recovered)
    return sp.csr_matrix(counts.T.astype(np.float32))


def to_anndata(counts, genes, cells, obs):
    import anndata
    import pandas as pd

    frame = pd.DataFrame({"cell_type": pd.Categorical(obs["trueLabel"].astype(str).to_numpy()),
                          "cell_type_full": pd.Categorical(obs["trueLabel_full"].astype(str).to_numpy())},
                         index=list(cells))
    return anndata.AnnData(counts, obs=frame, var=pd.DataFrame(index=list(genes)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="scMINER's data/pbmc14k_expression.eset.rda")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not os.path.isfile(args.source):
        raise SystemExit(f"error: --source {args.source} does not exist")
    log_cpm, genes, cells, obs = read_source(args.source)
    counts = counts_from_log_cpm(log_cpm)
    from guided_diffusion.sampling.writer import write_h5ad

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_h5ad(args.out, to_anndata(counts, genes, cells, obs))
    totals = np.asarray(counts.sum(axis=1)).ravel()
    print(f"{args.out}: {counts.shape[0]} cells x {counts.shape[1]} genes, {obs['trueLabel'].nunique()} labels, "
          f"median {np.median(totals):.0f} counts per cell")


if __name__ == "__main__":
    main()
