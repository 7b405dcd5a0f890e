r"""What decoded cells lack against real ones, on validation cells inside the training split: the shape of the counts
per gene, and the structured variation within each cell type.

    python benchmarks/bench_decoded_structure.py --levers R/levers --variant dl --seeds 0 1 2 \
        --label_key cell_type1 --out R/structure

``R/levers`` is a `benchmarks/bench_decoder_levers.py` output folder: ``split/train.h5ad`` (the fitting cells),
``split/heldout.h5ad`` (validation cells, never the held-out ones) and, per training seed, the fitting cells'
latents decoded with drawn counts (``VARIANT_seedS/decoded_fit.h5ad``, layer ``counts``). Two tables, averaged over
the seeds:

- **count shape**: genes binned by their mean count per fitting cell; per bin, among the entries where a gene is
  detected, the share that are a single count (fitting / validation / decoded cells), and the share of entries
  detected (validation / decoded);
- **within-type variation**: per label with at least ``--min_fit`` fitting and ``--min_validation`` validation
  cells, the leading ``--components`` principal components of the label's fitting cells (log-normalized, 10,000 per
  cell, the fitting cells' 2,000 most variable genes); the decoded cells' variance along the first three and along
  all of them, and their summed per-gene variance, each over the validation cells' (1 = as spread as unseen real
  cells).

Writes OUT/decoded_structure.md.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MEAN_BINS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, np.inf)
FEATURE_GENES = 2000


def gene_count_shape(counts):
    """Per gene of a cells x genes count matrix (dense or sparse): (cells detecting it, cells with exactly one
    count, mean count)."""
    import scipy.sparse as sp

    matrix = sp.csr_matrix(counts)
    detected = np.asarray((matrix > 0).sum(axis=0)).ravel()
    ones = np.asarray((matrix == 1).sum(axis=0)).ravel()
    return detected, ones, np.asarray(matrix.mean(axis=0)).ravel()


def count_shape_rows(fit, validation, decoded):
    """Rows (bin, genes, P(1 | > 0) fitting / validation / decoded, detected share validation / decoded) of the
    count-shape table; ``decoded`` is a list of count matrices (one per seed, averaged)."""
    fit_detected, fit_ones, fit_mean = gene_count_shape(fit)
    val_detected, val_ones, _ = gene_count_shape(validation)
    shapes = [gene_count_shape(d) for d in decoded]
    bins = np.digitize(fit_mean, MEAN_BINS) - 1
    rows = []
    for b in range(len(MEAN_BINS) - 1):
        genes = bins == b
        if not genes.any():
            continue

        def single(ones, detected):
            return ones[genes].sum() / max(detected[genes].sum(), 1)

        rows.append(((MEAN_BINS[b], MEAN_BINS[b + 1]), int(genes.sum()), single(fit_ones, fit_detected),
                     single(val_ones, val_detected), float(np.mean([single(o, d) for d, o, _ in shapes])),
                     val_detected[genes].sum() / validation.shape[0] / genes.sum(),
                     float(np.mean([d[genes].sum() / m.shape[0] / genes.sum() for (d, _, _), m in
                                    zip(shapes, decoded)]))))
    return rows


def variance_ratios(fit, validation, decoded, components):
    """(decoded / validation variance along the first 3 of ``fit``'s leading ``components`` principal components,
    the same along all of them, summed per-gene variance ratio) for log-normalized cells x genes arrays."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=components, random_state=0).fit(fit)
    real, made = pca.transform(validation).var(axis=0), pca.transform(decoded).var(axis=0)
    return (made[:3].sum() / real[:3].sum(), made.sum() / real.sum(),
            decoded.var(axis=0).sum() / validation.var(axis=0).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", required=True, help="a bench_decoder_levers.py output folder")
    parser.add_argument("--variant", default="dl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--label_key", default="cell_type1")
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--min_fit", type=int, default=30)
    parser.add_argument("--min_validation", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import anndata

    from guided_diffusion.data.normalize import log_normalize
    from guided_diffusion.data.variable_genes import rank_variable_genes

    def read(path):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found (run bench_decoder_levers.py with --variants "
                             f"{args.variant}=... and these --seeds first)")
        cells = anndata.read_h5ad(path)
        if args.label_key not in cells.obs.columns:
            raise SystemExit(f"error: --label_key {args.label_key!r} is not a column of {path}")
        return cells

    fit = read(os.path.join(args.levers, "split", "train.h5ad"))
    validation = read(os.path.join(args.levers, "split", "heldout.h5ad"))
    decoded = [read(os.path.join(args.levers, f"{args.variant}_seed{s}", "decoded_fit.h5ad")) for s in args.seeds]
    decoded_counts = [d.layers["counts"] if "counts" in d.layers else d.X for d in decoded]
    shape = count_shape_rows(fit.X, validation.X, decoded_counts)

    def dense(x):
        return np.asarray(x.todense()) if hasattr(x, "todense") else np.asarray(x)

    fit_x, val_x = log_normalize(dense(fit.X)), log_normalize(dense(validation.X))
    genes = np.sort(rank_variable_genes(fit_x, list(fit.var_names))[:FEATURE_GENES])
    fit_labels = fit.obs[args.label_key].astype(str).to_numpy()
    val_labels = validation.obs[args.label_key].astype(str).to_numpy()
    ratios = {}
    for cells, counts in zip(decoded, decoded_counts):
        made_x = log_normalize(dense(counts))[:, genes]
        made_labels = cells.obs[args.label_key].astype(str).to_numpy()
        for label in np.unique(fit_labels):
            f, v, m = fit_labels == label, val_labels == label, made_labels == label
            if f.sum() < args.min_fit or v.sum() < args.min_validation or m.sum() < 2:
                continue
            ratios.setdefault(label, []).append(
                variance_ratios(fit_x[f][:, genes], val_x[v][:, genes], made_x[m], args.components))

    lines = [f"Decoded fitting latents (`{args.variant}`, seeds {', '.join(map(str, args.seeds))}) against "
             f"validation cells; {args.levers}", "",
             "| mean count per fitting cell | genes | single counts among detected: fitting / validation / decoded "
             "| detected: validation / decoded |", "| --- | ---: | --- | --- |"]
    for (low, high), n, p_fit, p_val, p_made, d_val, d_made in shape:
        lines.append(f"| {low:g}–{high:g} | {n:,} | {p_fit:.3f} / {p_val:.3f} / {p_made:.3f} | "
                     f"{d_val:.4f} / {d_made:.4f} |")
    lines += ["", f"| label | validation cells | variance along PCs 1–3 | along PCs 1–{args.components} | summed "
                  "per gene |", "| --- | ---: | --- | --- | --- |"]
    for label in sorted(ratios, key=lambda name: -(val_labels == name).sum()):
        values = np.array(ratios[label])
        spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(3)
        mean = values.mean(axis=0)
        lines.append(f"| {label} | {(val_labels == label).sum()} | {mean[0]:.2f} ± {spread[0]:.2f} | "
                     f"{mean[1]:.2f} ± {spread[1]:.2f} | {mean[2]:.2f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decoded_structure.md"), "w") as stream:
        stream.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
