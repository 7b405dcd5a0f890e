r"""The diffusion model's share of the fidelity gap, in units of latent noise, on validation cells.

    python benchmarks/bench_diffusion_gap.py --vae_path R/seed0/autoencoder_t20/model_seed=0_best.pt \
        --fit R/split/train.h5ad --validation R/split/heldout.h5ad --samples R/seed0/t20-best_d8000/samples \
        --label_key cell_type1 --seed 0 --draws 3 --out R/diffusion_gap_seed0

(``R`` a `benchmarks/bench_recipes.sh` output folder run on a training split, so that its ``split/heldout.h5ad``
holds validation cells inside the training split, never the held-out ones.) Every set below is decoded with
drawn counts and scored against the validation cells with the evaluation's kNN / RF AUCs
(`exp_script/evaluation/metrics.expression_two_sample`), ``--draws`` count-draw seeds averaged (the draws alone
move an AUC by ~0.03):

- ``training_latents``: the fitting cells' own latents, their library sizes permuted within each label (what a
  perfect latent model would give through this decoder and the sampler's library sizes);
- ``training_latents_noise_S``: the same latents plus Gaussian noise of S times each latent dimension's sd, for
  each S in ``--noise`` (how fast the decoded cells become separable as latents move off the training cells);
- ``generated``: the sampler's latents (the samples folder of ``cell_sample.py --match_counts``) at their own
  target library sizes.

Beside them, without count noise: the decoded means of the generated latents against those of the training
latents (``means_generated_vs_training``); an AUC near 0.5 there says the generated latents decode to the
training cells' profiles. Writes OUT/diffusion_gap.tsv (one row per set and draw). One thread.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def generated_set(samples):
    """(obs, latents) of a cell_sample.py output folder, in the file's cell order."""
    import anndata

    from exp_script.gap_analysis import generated_latents

    generated = anndata.read_h5ad(os.path.join(samples, "generated.h5ad"), backed="r")
    try:
        obs = generated.obs.copy()
    finally:
        generated.file.close()
    return obs, generated_latents(samples, len(obs))


def decoded_means(autoencoder, latents, labels, key):
    """Decoded mean log-normalized expression of ``latents`` (no count draws; ``labels``, under ``key``, for a
    decoder that reads them)."""
    import pandas as pd

    from guided_diffusion.sampling.writer import decode_to_anndata

    obs = pd.DataFrame({key: pd.Categorical(labels)},
                       index=pd.Index([f"cell{i}" for i in range(len(latents))], name="cell"))
    data, _ = decode_to_anndata(autoencoder, np.asarray(latents, np.float32), obs, {}, progress=False)
    return np.asarray(data.X.toarray() if hasattr(data.X, "toarray") else data.X, dtype=np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_path", required=True)
    parser.add_argument("--fit", required=True,
                        help="the cells the autoencoder and the diffusion model were trained on")
    parser.add_argument("--validation", required=True, help="validation cells inside the training split")
    parser.add_argument("--samples", required=True, help="a cell_sample.py --match_counts output folder")
    parser.add_argument("--label_key", default="cell_type1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=3, help="count-draw seeds per set (AUCs averaged)")
    parser.add_argument("--noise", type=float, nargs="*", default=[0.1, 0.25, 0.5],
                        help="latent noise levels, in units of each latent dimension's sd")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from benchmarks.bench_observation_levers import decode, encoded_cells, library_variants, load_count_autoencoder
    from exp_script.evaluation import metrics
    from exp_script.evaluation.inputs import read_set
    from guided_diffusion.data import load_dataset

    autoencoder, _ = load_count_autoencoder(args.vae_path)
    dataset = load_dataset(args.fit, label_keys=[args.label_key], backed="auto")
    try:
        latents, labels, library = encoded_cells(autoencoder, dataset, args.label_key)
    finally:
        dataset.close()
    shuffled = library_variants(latents, labels, library, args.seed)["shuffled_library"]
    obs, generated = generated_set(args.samples)
    if args.label_key not in obs or "target_library_size" not in obs:
        raise SystemExit(f"error: {args.samples}/generated.h5ad has no {args.label_key} or target_library_size "
                         f"(sample a count model with cell_sample.py)")
    generated_labels = obs[args.label_key].astype(str).to_numpy()
    generated_library = obs["target_library_size"].to_numpy(np.float32)
    reference, genes = read_set(args.validation, args.label_key, "validation")
    rng = np.random.default_rng([args.seed, 9])
    sd = latents.std(axis=0, keepdims=True)
    sets = {"training_latents": (latents, labels, shuffled)}
    for level in args.noise:
        noisy = latents + rng.normal(size=latents.shape).astype(np.float32) * sd * level
        sets[f"training_latents_noise_{level:g}"] = (noisy, labels, shuffled)
    sets["generated"] = (generated, generated_labels, generated_library)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, (z, names_in, sizes) in sets.items():
        aucs = []
        for draw in range(args.draws):
            x, names = decode(autoencoder, np.asarray(z, np.float32), names_in, sizes, {}, args.label_key,
                              args.seed * 100 + draw, args.out)
            result = metrics.expression_two_sample(reference.x, reference.labels, x, names, genes, seed=args.seed)
            rows.append((name, draw, result["overall"]["knn_auc"], result["overall"]["rf_auc"]))
            aucs.append((result["overall"]["knn_auc"], result["overall"]["rf_auc"]))
        knn, rf = np.mean(aucs, axis=0)
        print(f"{name}\t{knn:.3f}\t{rf:.3f}", flush=True)
    means = metrics.expression_two_sample(decoded_means(autoencoder, latents, labels, args.label_key), labels,
                                          decoded_means(autoencoder, generated, generated_labels, args.label_key),
                                          generated_labels, genes,
                                          seed=args.seed)["overall"]
    rows.append(("means_generated_vs_training", 0, means["knn_auc"], means["rf_auc"]))
    print(f"means_generated_vs_training\t{means['knn_auc']:.3f}\t{means['rf_auc']:.3f}", flush=True)
    with open(os.path.join(args.out, "diffusion_gap.tsv"), "w") as stream:
        stream.write("set\tseed\tdraw\tknn_auc\trf_auc\n")
        stream.writelines(f"{s}\t{args.seed}\t{d}\t{k}\t{r}\n" for s, d, k, r in rows)


if __name__ == "__main__":
    main()
