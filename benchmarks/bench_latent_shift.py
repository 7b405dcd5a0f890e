r"""Latent arithmetic for an unseen (type, donor) combination, beside guidance: the scGen-style alternative.

    python benchmarks/bench_latent_shift.py --vae_path RUN/autoencoder/model_seed=0_step=600.pt \
        --train ROOT/train.h5ad --samples RUN/judge/samples --real dataset/baron_human.h5ad \
        --cell_type alpha --donor human2 --out RUN/judge_shift

``RUN``/``ROOT`` are a `benchmarks/bench_unseen_choice.sh` run: a two-key model trained without the
combination, whose sampler output ``--samples`` holds the type's cells of every donor (the seen ones generated
with their own labels). Instead of generating the unseen combination by guidance, each seen donor's generated
cells of the type are moved in the autoencoder's latent space by that donor's offset from the target donor,
measured on the training cells of the other types (the mean over types with at least 5 cells in both donors of
the difference of their mean latents, weighted by the smaller count), projected back onto the unit sphere, and
decoded with counts at their own library sizes. The seen combinations are decoded unchanged. Scored by
`exp_script/unseen_combination.py score` into OUT/score; ``--shift False`` decodes the seen donors' cells unmoved
(a donor-blind generator of the type).
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MIN_CELLS = 5


def mean_latents(latents, types, donors):
    means = {}
    for key in set(zip(types, donors)):
        rows = (types == key[0]) & (donors == key[1])
        means[key] = (latents[rows].mean(axis=0), int(rows.sum()))
    return means


def donor_offset(means, cell_type, source, target):
    """The mean latent difference target - source over the other types seen with both donors."""
    deltas, weights = [], []
    for (each_type, donor), (mean, count) in means.items():
        if donor != target or each_type == cell_type or (each_type, source) not in means:
            continue
        source_mean, source_count = means[(each_type, source)]
        if min(count, source_count) >= MIN_CELLS:
            deltas.append(mean - source_mean)
            weights.append(min(count, source_count))
    if not deltas:
        raise SystemExit(f"error: donors {source} and {target} share no other type with {MIN_CELLS}+ cells")
    return np.average(deltas, axis=0, weights=weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae_path", required=True)
    parser.add_argument("--train", required=True, help="the two-key model's training file")
    parser.add_argument("--samples", required=True, help="cell_sample.py output with the type's cells of every donor")
    parser.add_argument("--real", required=True, help="the full real file (the held-out combination's cells)")
    parser.add_argument("--cell_type", required=True)
    parser.add_argument("--donor", required=True)
    parser.add_argument("--shift", default="True", choices=["True", "False"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import anndata
    import pandas as pd
    import torch

    torch.set_num_threads(1)
    from exp_script.gap_analysis import generated_latents
    from exp_script.unseen_combination import score
    from guided_diffusion.data import load_dataset
    from guided_diffusion.sampling.writer import write_decoded_h5ad
    from VAE.VAE_model import load_autoencoder

    autoencoder, _ = load_autoencoder(args.vae_path)
    dataset = load_dataset(args.train, label_keys=["cell_type1", "donor"], backed="auto")
    try:
        latents = autoencoder.encode_dataset(dataset, progress=False)
        types = np.array(dataset.label_strings("cell_type1", dataset.label_codes[:, 0]))
        donors = np.array(dataset.label_strings("donor", dataset.label_codes[:, 1]))
    finally:
        dataset.close()
    means = mean_latents(latents, types, donors)
    generated = anndata.read_h5ad(os.path.join(args.samples, "generated.h5ad"), backed="r")
    obs = generated.obs
    generated_z = generated_latents(args.samples, generated.n_obs)
    g_types, g_donors = obs["cell_type1"].astype(str).to_numpy(), obs["donor"].astype(str).to_numpy()
    library = obs["target_library_size"].to_numpy().astype(np.float32)
    target = (g_types == args.cell_type) & (g_donors == args.donor)
    seen = ~target
    moved, moved_library = [], []
    for source in sorted(set(g_donors[seen & (g_types == args.cell_type)])):
        rows = seen & (g_types == args.cell_type) & (g_donors == source)
        z = generated_z[rows]
        if args.shift == "True":
            z = z + donor_offset(means, args.cell_type, source, args.donor)
        if autoencoder.model.latent_on_sphere:
            z = z / np.linalg.norm(z, axis=1, keepdims=True)
        moved.append(z)
        moved_library.append(library[rows])
    moved, moved_library = np.concatenate(moved), np.concatenate(moved_library)
    count = int(target.sum()) or int(np.sum(seen & (g_types == args.cell_type)) // max(1, len(set(g_donors))))
    pick = np.sort(np.random.default_rng([args.seed, 3]).choice(len(moved), min(count, len(moved)), replace=False))
    z = np.concatenate([generated_z[seen], moved[pick]]).astype(np.float32)
    labels = pd.DataFrame({"cell_type1": pd.Categorical(np.concatenate([g_types[seen], [args.cell_type] * len(pick)])),
                           "donor": pd.Categorical(np.concatenate([g_donors[seen], [args.donor] * len(pick)]))},
                          index=pd.Index([f"cell{i}" for i in range(len(z))], name="cell"))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "generated.h5ad")
    write_decoded_h5ad(path, autoencoder, torch.from_numpy(z), labels,
                       {"cfdiffusion": {"latent_shift_of": os.path.basename(args.samples)}}, progress=False,
                       library_sizes=np.concatenate([library[seen], moved_library[pick]]), seed=args.seed)
    summary = score(args.real, path, os.path.join(args.out, "score"), "cell_type1", "donor", args.cell_type,
                    args.donor, seed=args.seed)["summary"]
    print("\t".join(f"{k}={v:.3f}" for k, v in summary.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
