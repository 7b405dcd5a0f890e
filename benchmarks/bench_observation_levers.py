r"""Observation-model levers of a trained count autoencoder, on validation cells inside the training split.

    python benchmarks/bench_observation_levers.py --vae_path R/levers/refit_dispersion_seed0/model_seed=0_best.pt \
        --fit R/levers/split/train.h5ad --validation R/levers/split/heldout.h5ad --label_key cell_type1 \
        --seed 0 --out R/observation_seed0

(``R/levers`` is a `benchmarks/bench_decoder_levers.py` output folder: its ``split`` holds the fitting and the
validation cells, never the held-out ones.) The fitting cells' own latents are decoded with drawn counts ("a
perfect latent model through this decoder") four ways, each scored against the validation cells with the
evaluation's kNN / RF AUCs (`exp_script/evaluation/metrics.expression_two_sample`):

- ``own_library``: each cell's own library size and the checkpoint's per-gene dispersion (the reference);
- ``shuffled_library``: library sizes permuted within each label — what the sampler does, which draws a
  generated cell's library size from its label's distribution independently of its latent;
- ``neighbour_library``: the library size of one of the cell's 5 nearest latent neighbours of its label (what a
  latent-aware library-size model could give at best);
- ``per_label_dispersion``: each label with at least ``--min_cells`` fitting cells gets its own per-gene
  dispersion, refitted by maximum likelihood on its cells (decoder frozen, from the learned dispersion, as
  ``VAE_train.py --refit_dispersion`` does for all cells); smaller labels keep the shared one.

More relax the independent negative binomial itself (``--variants nb_draw low_rank_residual zero_inflation
per_label_residual count_shape_oracle``); they draw counts here (numpy, each cell's own library size) from the decoded shares, beside ``nb_draw``, the plain
negative binomial drawn the same way, which is their reference:

- ``low_rank_residual``: correlated variation between cells beyond the count noise. The fitting cells' residuals
  (log-normalized expression minus the decoded mean's, on the evaluation's 2,000 most variable genes) are
  decomposed (SVD); each component's variance in excess of what counts drawn from the model itself put on it is
  given back to the decoded means as Gaussian noise along the top ``--rank`` components (a log-normal Poisson
  with a low-rank covariance on top of the negative binomial);
- ``zero_inflation``: a zero-inflated negative binomial, each of the 2,000 genes' zero probability and dispersion
  refitted by maximum likelihood over a grid with the decoded mean fixed (the mean of the negative-binomial part
  is the decoded mean over 1 - pi, so a cell's expected counts stay the decoder's);
- ``per_label_residual``: ``low_rank_residual`` with each label's own components and excess variances (labels with
  at least ``--min_cells`` fitting cells; smaller ones keep the plain draws): the correlated variation within a
  cell type rather than across the whole dataset;
- ``latent_spread`` and ``share_spread`` (diagnostics): each cell's latent (back on the unit sphere when the
  autoencoder's latents live there), or its log decoded share, moved away from its label's mean by the factor
  ``--spread`` (below 1: towards it). Decoded cells have less variance along their type's leading components than
  real ones (`bench_decoded_structure.py`); if that were a matter of scale, a factor above 1 would bring them closer;
- ``neighbour_mean`` and ``neighbour_residual``: a decoder that reads the data near the latent. Each cell's share
  is the pooled share (summed counts over summed library sizes) of its ``--neighbours`` nearest fitting latents of
  its label, itself excluded (a generated latent has no own cell among the fitting cells, so leaving the cell out is
  what generation would see); ``neighbour_residual`` keeps the decoder's share and multiplies it, gene by gene, by
  the neighbours' summed counts over their summed decoded means (the decoder's local bias, pooled; one pseudo-count
  of the decoded mean in both sums). If the decoded cells lack the real within-type structure because the decoder
  is too smooth, reading it off the neighbours brings them closer;
- ``count_shape_oracle`` (a diagnostic, not a model): the ``nb_draw`` counts with each gene's nonzero counts
  replaced, rank for rank, by the quantiles of that gene's nonzero counts in the fitting cells — which cells
  detect a gene stays the model's, the distribution of its counts where detected becomes the real one's. If it
  scores like ``nb_draw``, the shape of the count noise is not what tells decoded cells from real ones.

Every variant decodes the labels in the same blocks with the same count-draw seeds, so only the variant differs;
``--draws N`` repeats the count draws with N seeds and averages the AUCs (the draws alone move them by ~0.03).
Writes OUT/observation_levers.tsv (one row per variant and draw). One thread.
"""
import argparse
import copy
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NEIGHBOURS = 5
VARIANTS = ("own_library", "shuffled_library", "neighbour_library", "per_label_dispersion")
LIKELIHOOD_VARIANTS = ("nb_draw", "low_rank_residual", "zero_inflation", "per_label_residual", "count_shape_oracle",
                       "latent_spread", "share_spread", "neighbour_mean", "neighbour_residual")
RESIDUAL_GENES = 2000  # the evaluation's feature genes
ZERO_PROBABILITIES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DISPERSION_FACTORS = (0.25, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 4.0, 8.0)  # theta multiplied by


def load_count_autoencoder(vae_path):
    """(autoencoder, checkpoint) of ``vae_path``; exits with a one-line error unless it models counts."""
    from VAE.VAE_model import load_autoencoder

    autoencoder, checkpoint = load_autoencoder(vae_path)
    if not autoencoder.model.models_counts:
        raise SystemExit("error: --vae_path has no count model (trained with --loss_ae mse)")
    return autoencoder, checkpoint


def encoded_cells(autoencoder, dataset, label_key):
    """(latents, labels, library sizes) of every cell of ``dataset``."""
    latents = autoencoder.encode_dataset(dataset, progress=False)
    labels = np.array(dataset.label_strings(label_key, dataset.label_codes[:, 0]))
    return latents, labels, np.asarray(dataset.library_sizes(), dtype=np.float32)


def library_variants(latents, labels, library, seed):
    """{variant: library sizes} for the three library-size variants."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng([seed, 5])
    shuffled, neighbour = library.copy(), library.copy()
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        shuffled[cells] = library[rng.permutation(cells)]
        k = min(NEIGHBOURS + 1, len(cells))
        if k > 1:
            _, nearest = NearestNeighbors(n_neighbors=k).fit(latents[cells]).kneighbors(latents[cells])
            # the cell itself is among its k nearest (not always first: cells with equal latents tie); drop it
            others = np.array([row[row != i][:k - 1] for i, row in enumerate(nearest)])
            chosen = others[np.arange(len(cells)), rng.integers(0, k - 1, len(cells))]
            neighbour[cells] = library[cells[chosen]]
    return {"own_library": library, "shuffled_library": shuffled, "neighbour_library": neighbour}


def per_label_dispersions(autoencoder, checkpoint, dataset, labels, min_cells, seed):
    """{label: log theta} refitted on each label with at least ``min_cells`` cells, from the learned dispersion."""
    import torch

    from VAE.autoencoder_training import refit_dispersion

    start = copy.deepcopy(autoencoder.model)
    if checkpoint.dispersion_fit is not None:
        with torch.no_grad():
            start.log_theta.copy_(torch.as_tensor(checkpoint.dispersion_fit["learned_log_theta"]))
    fitted = {}
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        if len(cells) >= min_cells:
            fitted[label], _ = refit_dispersion(start, dataset, cells, seed)
    return fitted


def decode(autoencoder, latents, labels, library, log_thetas, key, seed, folder):
    """Decode label by label (count draws seeded by label position) and read the cells back."""
    import pandas as pd
    import torch

    from exp_script.evaluation.inputs import read_set
    from guided_diffusion.sampling.writer import write_decoded_h5ad

    xs, names = [], []
    for position, label in enumerate(np.unique(labels)):
        cells = np.flatnonzero(labels == label)
        model = autoencoder
        if label in log_thetas:
            model = copy.deepcopy(autoencoder)
            with torch.no_grad():
                model.model.log_theta.copy_(log_thetas[label])
        path = os.path.join(folder, f"label{position}.h5ad")
        obs = pd.DataFrame({key: pd.Categorical([label] * len(cells))},
                           index=pd.Index([f"cell{i}" for i in cells], name="cell"))
        write_decoded_h5ad(path, model, torch.from_numpy(latents[cells]), obs, {"cfdiffusion": {}}, progress=False,
                           library_sizes=library[cells], seed=seed * 1000 + position)
        part, _ = read_set(path, key, label)
        xs.append(part.x)
        names.append(part.labels)
        os.remove(path)
    return np.concatenate(xs), np.concatenate(names)


def decoded_shares(autoencoder, latents, labels, key):
    """Each cell's decoded share of its counts per gene (cells x genes, float64), the decoder reading its label."""
    import pandas as pd
    import torch

    model = autoencoder.model
    codes = autoencoder.decoder_codes(pd.DataFrame({key: labels}))
    codes = None if codes is None else torch.from_numpy(codes)
    with torch.inference_mode():
        logits = model._in_eval_mode(lambda z: model.run_decoder(z, codes), torch.from_numpy(latents))
    return torch.softmax(logits.double(), dim=1).numpy()


def draw_counts(mean, theta, rng, zero_probability=None):
    """Negative-binomial counts (Poisson of a Gamma) of ``mean`` (cells x genes) and per-gene ``theta``; with
    ``zero_probability`` (per gene) each entry is then set to 0 with that probability."""
    counts = rng.poisson(rng.gamma(theta[None, :], mean / theta[None, :])).astype(np.float64)
    if zero_probability is not None:
        counts[rng.random(counts.shape) < zero_probability[None, :]] = 0.0
    return counts


def residual_excess(counts, share, theta, genes, rng):
    """(components, excess variances): the SVD of the cells' residuals (log-normalized expression minus the decoded
    mean's, on ``genes``, centred) and, per component, its variance minus that of counts drawn from the model itself
    (the count noise alone), floored at 0. The top components of a finite sample also carry some count noise
    chosen by the SVD (~0.1 of their variance in 1,500 cells x 80 genes of pure count noise): an upper estimate."""
    from guided_diffusion.data.normalize import log_normalize

    library = counts.sum(axis=1)
    mean_expression = np.log1p(share[:, genes] * 1e4)
    real = log_normalize(counts)[:, genes] - mean_expression
    null = log_normalize(draw_counts(share * library[:, None], theta, rng))[:, genes] - mean_expression
    real -= real.mean(axis=0)
    null -= null.mean(axis=0)
    _, singular, components = np.linalg.svd(real, full_matrices=False)
    variance = singular ** 2 / len(real)
    null_variance = ((null @ components.T) ** 2).mean(axis=0)
    return components, np.maximum(variance - null_variance, 0.0)


def low_rank_shares(share, genes, components, excess, rank, rng):
    """``share`` with Gaussian noise of the excess variances along the top ``rank`` components added to the decoded
    log-normalized means of ``genes`` (renormalized to shares)."""
    rank = min(rank, len(excess))
    noise = (rng.standard_normal((len(share), rank)) * np.sqrt(excess[:rank])) @ components[:rank]
    moved = share.copy()
    moved[:, genes] = np.maximum(np.expm1(np.log1p(share[:, genes] * 1e4) + noise), 0.0) / 1e4
    return moved / moved.sum(axis=1, keepdims=True)


def per_label_low_rank_shares(counts, share, theta, genes, labels, rank, min_cells, rng):
    """``share`` with each label's own correlated residual variation added (:func:`residual_excess` and
    :func:`low_rank_shares` on the cells of each label with at least ``min_cells`` cells; others unchanged)."""
    moved = share.copy()
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        if len(cells) >= min_cells:
            components, excess = residual_excess(counts[cells], share[cells], theta, genes, rng)
            moved[cells] = low_rank_shares(share[cells], genes, components, excess, rank, rng)
    return moved


def spread_latents(latents, labels, factor, on_sphere):
    """Each label's latents moved ``factor`` times as far from the label's mean latent (then back to unit norm when
    ``on_sphere``)."""
    moved = np.array(latents, dtype=np.float64)
    for label in np.unique(labels):
        rows = labels == label
        centre = moved[rows].mean(axis=0)
        moved[rows] = centre + factor * (moved[rows] - centre)
    if on_sphere:
        moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    return moved.astype(np.float32)


def spread_shares(share, labels, factor):
    """Each cell's log share moved ``factor`` times as far from its label's mean log share, as shares again."""
    log_share = np.log(share)
    for label in np.unique(labels):
        rows = labels == label
        centre = log_share[rows].mean(axis=0)
        log_share[rows] = centre + factor * (log_share[rows] - centre)
    moved = np.exp(log_share - log_share.max(axis=1, keepdims=True))
    return moved / moved.sum(axis=1, keepdims=True)


def neighbour_shares(latents, labels, counts, share, neighbours):
    """(pooled, corrected) shares of every cell from its ``neighbours`` nearest other latents of its label (Euclidean;
    a label with fewer cells uses all its other cells; a label with one cell keeps the decoded share):
    pooled = summed counts / summed library sizes of the neighbours; corrected = ``share`` times, per gene, the
    neighbours' (summed counts + summed decoded mean) / (2 x summed decoded mean), renormalized."""
    from sklearn.neighbors import NearestNeighbors

    library = counts.sum(axis=1)
    mean = share * library[:, None]
    pooled, corrected = share.copy(), share.copy()
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        if len(cells) < 2:
            continue
        k = min(neighbours, len(cells) - 1)
        found = NearestNeighbors(n_neighbors=k + 1).fit(latents[cells]).kneighbors(latents[cells],
                                                                                return_distance=False)
        for row, cell in enumerate(cells):
            others = cells[[j for j in found[row] if j != row][:k]]
            summed = counts[others].sum(axis=0)
            pooled[cell] = summed / library[others].sum()
            expected = mean[others].sum(axis=0)
            corrected[cell] = share[cell] * (summed + expected) / (2.0 * expected)
    return pooled, corrected / corrected.sum(axis=1, keepdims=True)


def match_nonzero_counts(drawn, real, rng):
    """``drawn`` (cells x genes) with each gene's nonzero entries replaced, in rank order (ties broken at random),
    by the matching quantiles of the nonzero entries of ``real``'s same gene; zeros stay, and a gene without
    nonzero entries in either stays as drawn."""
    matched = drawn.copy()
    for gene in range(drawn.shape[1]):
        cells = np.flatnonzero(drawn[:, gene])
        target = np.sort(real[:, gene][real[:, gene] > 0])
        if len(cells) == 0 or len(target) == 0:
            continue
        order = cells[np.lexsort((rng.random(len(cells)), drawn[cells, gene]))]
        quantiles = (np.arange(len(cells)) + 0.5) / len(cells)
        matched[order, gene] = target[np.minimum((quantiles * len(target)).astype(int), len(target) - 1)]
    return matched


def zero_inflation_fit(counts, mean, theta):
    """Per gene (columns of ``counts``), the zero probability and dispersion of the zero-inflated negative binomial
    that maximize the likelihood of ``counts`` over the grid (ZERO_PROBABILITIES x theta x DISPERSION_FACTORS), the
    mean fixed: the negative-binomial part's mean is ``mean`` / (1 - pi). Returns (pi, theta)."""
    from scipy.special import gammaln, logsumexp

    zero = counts == 0
    best = np.full(counts.shape[1], -np.inf)
    best_pi, best_theta = np.zeros(counts.shape[1]), theta.astype(np.float64).copy()
    for pi in ZERO_PROBABILITIES:
        for factor in DISPERSION_FACTORS:
            t = theta[None, :] * factor
            m = mean / (1.0 - pi)
            log_zero = t * (np.log(t) - np.log(t + m))
            log_nb = (gammaln(counts + t) - gammaln(t) - gammaln(counts + 1) + log_zero
                      + counts * (np.log(np.maximum(m, 1e-300)) - np.log(t + m)))
            if pi == 0:
                log_likelihood = log_nb.sum(axis=0)
            else:
                with_zero = logsumexp([np.full_like(log_zero, np.log(pi)), np.log1p(-pi) + log_zero], axis=0)
                log_likelihood = np.where(zero, with_zero, np.log1p(-pi) + log_nb).sum(axis=0)
            better = log_likelihood > best
            best[better], best_pi[better], best_theta[better] = log_likelihood[better], pi, t[0, better]
    return best_pi, best_theta


def likelihood_variants(autoencoder, dataset, latents, labels, key, rank, seed, min_cells=30, spread=1.5,
                        neighbours=10):
    """{variant: (mean counts, theta, zero probability or None)} of the fitting cells for LIKELIHOOD_VARIANTS,
    at each cell's own library size, and the fitting cells' counts (for ``count_shape_oracle``)."""
    from guided_diffusion.data.variable_genes import rank_variable_genes

    rows = np.arange(dataset.n_cells)
    counts = np.asarray(dataset.raw_rows(rows), dtype=np.float64)
    library = counts.sum(axis=1)
    share = decoded_shares(autoencoder, latents, labels, key)
    theta = np.exp(autoencoder.model.log_theta.detach().double().numpy())
    genes = np.sort(rank_variable_genes(dataset.rows(rows), list(dataset.genes))[:RESIDUAL_GENES])
    rng = np.random.default_rng([seed, 7])
    components, excess = residual_excess(counts, share, theta, genes, rng)
    moved = low_rank_shares(share, genes, components, excess, rank, rng)
    pi, fitted = zero_inflation_fit(counts[:, genes], share[:, genes] * library[:, None], theta[genes])
    zero_probability, zinb_theta = np.zeros_like(theta), theta.copy()
    zero_probability[genes], zinb_theta[genes] = pi, fitted
    mean = share * library[:, None]
    per_label = per_label_low_rank_shares(counts, share, theta, genes, labels, rank, min_cells, rng)
    spread_latent_share = decoded_shares(autoencoder, spread_latents(latents, labels, spread,
                                                                     autoencoder.model.latent_on_sphere), labels, key)
    pooled, corrected = neighbour_shares(latents, labels, counts, share, neighbours)
    return {"nb_draw": (mean, theta, None),
            "neighbour_mean": (pooled * library[:, None], theta, None),
            "neighbour_residual": (corrected * library[:, None], theta, None),
            "low_rank_residual": (moved * library[:, None], theta, None),
            "zero_inflation": (mean / (1.0 - zero_probability[None, :]), zinb_theta, zero_probability),
            "per_label_residual": (per_label * library[:, None], theta, None),
            "count_shape_oracle": (mean, theta, None),
            "latent_spread": (spread_latent_share * library[:, None], theta, None),
            "share_spread": (spread_shares(share, labels, spread) * library[:, None], theta, None)}, counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_path", required=True)
    parser.add_argument("--fit", required=True, help="the cells the autoencoder was trained on")
    parser.add_argument("--validation", required=True, help="validation cells inside the training split")
    parser.add_argument("--label_key", default="cell_type1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_cells", type=int, default=30,
                        help="per_label_dispersion / per_label_residual: labels with fewer fitting cells keep the shared fit")
    parser.add_argument("--draws", type=int, default=1, help="count-draw seeds per variant (AUCs averaged)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + LIKELIHOOD_VARIANTS)
    parser.add_argument("--rank", type=int, default=10, help="low_rank_residual: the residual components used")
    parser.add_argument("--spread", type=float, default=1.5,
                        help="latent_spread / share_spread: the factor on each cell's distance from its label's mean")
    parser.add_argument("--neighbours", type=int, default=10,
                        help="neighbour_mean / neighbour_residual: the nearest fitting latents of the label read")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from exp_script.evaluation import metrics
    from exp_script.evaluation.inputs import read_set
    from guided_diffusion.data import load_dataset
    from guided_diffusion.data.normalize import log_normalize

    autoencoder, checkpoint = load_count_autoencoder(args.vae_path)
    dataset = load_dataset(args.fit, label_keys=[args.label_key], backed="auto")
    try:
        latents, labels, library = encoded_cells(autoencoder, dataset, args.label_key)
        dispersions = {}
        if "per_label_dispersion" in args.variants:
            dispersions = per_label_dispersions(autoencoder, checkpoint, dataset, labels, args.min_cells, args.seed)
        likelihoods, fit_counts = {}, None
        if set(args.variants) & set(LIKELIHOOD_VARIANTS):
            likelihoods, fit_counts = likelihood_variants(autoencoder, dataset, latents, labels, args.label_key,
                                                          args.rank, args.seed, args.min_cells, args.spread,
                                                          args.neighbours)
    finally:
        dataset.close()
    libraries = library_variants(latents, labels, library, args.seed)
    reference, genes = read_set(args.validation, args.label_key, "validation")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for variant in args.variants:
        sizes = libraries.get(variant, library)
        thetas = dispersions if variant == "per_label_dispersion" else {}
        aucs = []
        for draw in range(args.draws):
            if variant in likelihoods:
                mean, theta, zero_probability = likelihoods[variant]
                rng = np.random.default_rng([args.seed, draw, 11])
                counts = draw_counts(mean, theta, rng, zero_probability)
                if variant == "count_shape_oracle":
                    counts = match_nonzero_counts(counts, fit_counts, rng)
                x, names = log_normalize(counts), labels
            else:
                x, names = decode(autoencoder, latents, labels, sizes, thetas, args.label_key,
                                  args.seed * 100 + draw, args.out)
            result = metrics.expression_two_sample(reference.x, reference.labels, x, names, genes, seed=args.seed,
                                                   use_rf=True)["overall"]
            rows.append((variant, draw, result["knn_auc"], result["rf_auc"]))
            aucs.append((result["knn_auc"], result["rf_auc"]))
        knn, rf = np.mean(aucs, axis=0)
        print(f"{variant}\t{knn:.3f}\t{rf:.3f}", flush=True)
    with open(os.path.join(args.out, "observation_levers.tsv"), "w") as stream:
        stream.write("variant\tseed\tdraw\tknn_auc\trf_auc\n")
        stream.writelines(f"{v}\t{args.seed}\t{d}\t{k}\t{r}\n" for v, d, k, r in rows)


if __name__ == "__main__":
    main()
