r"""Screen autoencoder levers on validation cells inside the training split (the held-out cells are never read).

    python benchmarks/bench_decoder_levers.py --train R/split/train.h5ad --label_key cell_type1 \
        --out R/levers --seeds 0 1 --variants baseline kl_0.1 noise_0.05 [--ae_flags "--num_genes 20125"]

The training split is split again (stratified by label, ``--val_fraction``, seed ``--split_seed``) into fitting
cells and validation cells. Per variant and seed the autoencoder is trained on the fitting cells only
(`VAE/VAE_train.py`, early stopping on its own validation loss inside the fitting cells), then the fitting cells
and the validation cells are reconstructed with drawn counts and scored against the validation cells with the
evaluation's two-sample AUCs (`exp_script/evaluation/metrics.expression_two_sample`), beside the positive
control (fitting cells vs validation cells). The figure that bounds the generator is "decoded fitting latents"
(a perfect latent model through this decoder); "reconstructed validation" is the decoder on unseen cells.
``--fit_cells N`` trains and decodes a stratified draw of N fitting cells instead (the same draw for every variant
and seed; the validation cells unchanged): run it at several N, each into its own --out, for the bound's curve
over the number of training cells.

Writes OUT/levers.tsv (one row per variant and seed) and OUT/summary.md (mean ± sd over seeds). A variant is
``name`` from VARIANTS or ``name=--flag value ...``; ``{seed}`` in a variant's flags is the run's training seed
(e.g. ``--init_from P/pretrain_seed{seed}/model_seed={seed}_best.pt``, an autoencoder pretrained per seed). Runs
whose row exists are reused (delete the row's folder to redo; ``--rescore`` scores them again with their saved
autoencoders). Every process runs on --threads threads.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "baseline": "",
    "noise_0.05": "--latent_noise 0.05",
    "noise_0.2": "--latent_noise 0.2",
    "kl_0.01": "--kl_weight 0.01",
    "kl_0.1": "--kl_weight 0.1",
    "kl_1": "--kl_weight 1",
    "small": "--hidden_dims 256 256 --latent_dim 32",
    "small_kl_0.1": "--hidden_dims 256 256 --latent_dim 32 --kl_weight 0.1",
    "small_kl_1": "--hidden_dims 256 256 --latent_dim 32 --kl_weight 1",
    "tiny": "--hidden_dims 128 --latent_dim 10",
    "tiny_kl_1": "--hidden_dims 128 --latent_dim 10 --kl_weight 1",
    "mid": "--hidden_dims 512 512 --latent_dim 64",
    "tiny_latent20": "--hidden_dims 128 --latent_dim 20",
    "tiny_latent5": "--hidden_dims 128 --latent_dim 5",
    "tiny_h64": "--hidden_dims 64 --latent_dim 10",
    "tiny_h256": "--hidden_dims 256 --latent_dim 10",
    "tiny_2layers": "--hidden_dims 128 128 --latent_dim 10",
    "scvi_like": "--hidden_dims 128 --latent_dim 30 --kl_weight 1 --dropout 0.1",
    "small_latent16": "--hidden_dims 256 256 --latent_dim 16",
    "small_latent64": "--hidden_dims 256 256 --latent_dim 64",
    "small_dropout_0.1": "--hidden_dims 256 256 --latent_dim 32 --dropout 0.1",
    "dropout_0.2": "--dropout 0.2",
    "dispersion_lr_0.01": "--hidden_dims 128 --latent_dim 20 --dispersion_lr 0.01 --refit_dispersion False",
    "dispersion_lr_0.1": "--hidden_dims 128 --latent_dim 20 --dispersion_lr 0.1 --refit_dispersion False",
    "refit_dispersion": "--hidden_dims 128 --latent_dim 20 --refit_dispersion True",
    "no_refit_dispersion": "--hidden_dims 128 --latent_dim 20 --refit_dispersion False",
}
COLUMNS = ["variant", "seed", "best_step", "train_seconds", "control_knn_auc", "control_rf_auc",
           "decoded_fit_knn_auc", "decoded_fit_rf_auc", "reconstructed_val_knn_auc", "reconstructed_val_rf_auc",
           "val_loss"]


def parse_variant(text):
    name, _, flags = text.partition("=")
    if not flags and name not in VARIANTS:
        raise SystemExit(f"error: unknown variant {name!r}; known: {', '.join(VARIANTS)} (or name=--flags)")
    return name, flags if flags else VARIANTS[name]


def run(command, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)


def split(args):
    fit, val = os.path.join(args.out, "split", "train.h5ad"), os.path.join(args.out, "split", "heldout.h5ad")
    if not os.path.isfile(val):
        run([sys.executable, "exp_script/split.py", "--data_dir", args.train, "--label_key", args.label_key,
             "--out", os.path.join(args.out, "split"), "--heldout_fraction", str(args.val_fraction),
             "--seed", str(args.split_seed)], args.threads)
    if args.fit_cells:
        fit = fitting_subset(fit, args.fit_cells, args.label_key, args.split_seed)
    return fit, val


def fitting_subset(fit, n_cells, label_key, seed):
    """The path of a stratified draw of ``n_cells`` of the fitting cells (label proportions kept; all of them when
    there are no more), written beside them once as fit_cells=N.h5ad."""
    import anndata

    from exp_script.evaluation.features import stratified_subsample
    from guided_diffusion.sampling.writer import write_h5ad

    path = os.path.join(os.path.dirname(fit), f"fit_cells={n_cells}.h5ad")
    if not os.path.isfile(path):
        cells = anndata.read_h5ad(fit)
        if label_key not in cells.obs.columns:
            raise SystemExit(f"error: --label_key {label_key!r} is not a column of {fit}")
        rows = stratified_subsample(cells.obs[label_key].astype(str).to_numpy(), n_cells,
                                    np.random.default_rng([seed, 3]))
        write_h5ad(path, cells[rows].copy())
    return path


def score(args, vae_path, fit, val, folder, seed):
    from exp_script.evaluation.autoencoder_choice import realism_scores

    return realism_scores(vae_path, fit, val, args.label_key, seed, folder)


def seeded_flags(flags, seed):
    """A variant's flags as a list, ``{seed}`` replaced by the run's training seed."""
    return [part.replace("{seed}", str(seed)) for part in shlex.split(flags)]


def one_run(args, name, flags, seed, fit, val, done):
    folder = os.path.join(args.out, f"{name}_seed{seed}")
    if (name, seed) in done:
        row = done[(name, seed)]
        if args.rescore:
            row.update(score(args, os.path.join(folder, f"model_seed={seed}_best.pt"), fit, val, folder, seed))
            write_table(args.out, done.values())
        return row
    start = time.time()
    run([sys.executable, "VAE/VAE_train.py", "--data_dir", fit, "--save_dir", folder, "--max_steps",
         str(args.max_steps), "--checkpoint_freq", str(args.max_steps), "--log_interval", "20",
         "--early_stopping_patience", str(args.patience), "--seed", str(seed), "--threads", str(args.threads),
         "--progress", "False", "--overwrite", "True"] + shlex.split(args.ae_flags) + seeded_flags(flags, seed),
        args.threads)
    seconds = time.time() - start
    vae_path = os.path.join(folder, f"model_seed={seed}_best.pt")
    from VAE.autoencoder_checkpoint import AutoencoderCheckpoint

    best = AutoencoderCheckpoint.load(vae_path)
    row = {"variant": name, "seed": seed, "best_step": best.step, "train_seconds": round(seconds, 1),
           "val_loss": best.selection["val_loss"], **score(args, vae_path, fit, val, folder, seed)}
    with open(os.path.join(args.out, "levers.tsv"), "a") as stream:
        stream.write("\t".join(str(row[c]) for c in COLUMNS) + "\n")
    return row


def write_table(out, rows):
    with open(os.path.join(out, "levers.tsv"), "w") as stream:
        stream.write("\t".join(COLUMNS) + "\n")
        for row in rows:
            stream.write("\t".join(str(row[c]) for c in COLUMNS) + "\n")


def mean_sd(values):
    """"mean ± sd" over seeds (sd 0 for one seed), three decimals."""
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"


def summary(rows, names):
    keys = [c for c in COLUMNS if c.endswith("_auc")] + ["best_step", "train_seconds"]
    lines = ["| variant | " + " | ".join(keys) + " | seeds |", "|---" * (len(keys) + 2) + "|"]
    for name in names:
        chosen = [r for r in rows if r["variant"] == name]
        cells = []
        for key in keys:
            cells.append(mean_sd([float(r[key]) for r in chosen]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(chosen)} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="the training split (the held-out file is never given)")
    parser.add_argument("--label_key", default="cell_type1")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["baseline"])
    parser.add_argument("--ae_flags", default="", help="flags every autoencoder run gets (e.g. --layer ...)")
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--patience", type=int, default=150)
    parser.add_argument("--val_fraction", type=float, default=0.15)
    parser.add_argument("--split_seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit_cells", type=int, default=0,
                        help="train on a stratified draw of this many fitting cells (0: all of them)")
    parser.add_argument("--rescore", action="store_true",
                        help="score the runs already in OUT/levers.tsv again with their saved autoencoders (after a "
                             "change of the scoring); new runs are trained as usual")
    args = parser.parse_args()
    if args.fit_cells < 0:
        parser.error("--fit_cells must be 0 (every fitting cell) or a positive count")
    os.makedirs(args.out, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    fit, val = split(args)
    table = os.path.join(args.out, "levers.tsv")
    done = {}
    if os.path.isfile(table):
        for line in open(table).read().splitlines()[1:]:
            row = dict(zip(COLUMNS, line.split("\t")))
            done[(row["variant"], int(row["seed"]))] = row
    else:
        with open(table, "w") as stream:
            stream.write("\t".join(COLUMNS) + "\n")
    variants = [parse_variant(v) for v in args.variants]
    rows = []
    for seed in args.seeds:
        for name, flags in variants:
            row = one_run(args, name, flags, seed, fit, val, done)
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = summary(rows, [name for name, _ in variants])
    with open(os.path.join(args.out, "summary.md"), "w") as stream:
        stream.write(text)
    print(text)


if __name__ == "__main__":
    main()
