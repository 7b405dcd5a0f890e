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

    from exp_script.gap_analysis import read_set
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_path", required=True)
    parser.add_argument("--fit", required=True, help="the cells the autoencoder was trained on")
    parser.add_argument("--validation", required=True, help="validation cells inside the training split")
    parser.add_argument("--label_key", default="cell_type1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_cells", type=int, default=30)
    parser.add_argument("--draws", type=int, default=1, help="count-draw seeds per variant (AUCs averaged)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from exp_script.evaluation import metrics
    from exp_script.gap_analysis import read_set
    from guided_diffusion.data import load_dataset

    autoencoder, checkpoint = load_count_autoencoder(args.vae_path)
    dataset = load_dataset(args.fit, label_keys=[args.label_key], backed="auto")
    try:
        latents, labels, library = encoded_cells(autoencoder, dataset, args.label_key)
        dispersions = per_label_dispersions(autoencoder, checkpoint, dataset, labels, args.min_cells, args.seed)
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
            x, names = decode(autoencoder, latents, labels, sizes, thetas, args.label_key, args.seed * 100 + draw,
                              args.out)
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
