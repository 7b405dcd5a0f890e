r"""The autoencoder's realism over its training steps, beside its validation loss (validation cells inside the
training split; the held-out cells are never read).

    python benchmarks/bench_autoencoder_steps.py --train R/split/train.h5ad --label_key cell_type1 \
        --out R/steps --seeds 0 1 2 --max_steps 3000 --every 250 [--ae_flags "--decoder_label_key cell_type1"]

Early stopping keeps the weights of the lowest validation loss, a likelihood summed over every gene. Whether those
are also the weights whose cells are hardest to tell from real ones is what this measures: the training split is
split into fitting and validation cells exactly as ``bench_decoder_levers.py`` splits it (the same ``--val_fraction``
and ``--split_seed``, the same folder layout), one autoencoder per seed trains on the fitting cells for
``--max_steps`` steps without stopping, a checkpoint every ``--every`` steps, and each checkpoint — its dispersion
refitted as a finished run's is — is scored by the choice's realism figures
(``exp_script.evaluation.autoencoder_choice.realism_scores``: the fitting cells' decoded latents and the validation
cells' reconstructions against the validation cells, kNN and RF AUC) and their mean, the choice's criterion.

Writes OUT/steps.tsv (one row per seed and step) and OUT/summary.md (per step mean ± sd over seeds, and per seed
the step early stopping keeps, the step with the lowest criterion, and both steps' criteria). Rows already in
steps.tsv are reused and an interrupted run resumes from its newest checkpoint. Every process runs on --threads
threads.
"""
import argparse
import csv
import glob
import os
import re
import shlex
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_decoder_levers import mean_sd, run, split  # noqa: E402

COLUMNS = ["seed", "step", "val_loss", "decoded_fit_knn_auc", "decoded_fit_rf_auc", "reconstructed_val_knn_auc",
           "reconstructed_val_rf_auc", "control_knn_auc", "control_rf_auc", "criterion"]
SCORES = ["decoded_fit_knn_auc", "decoded_fit_rf_auc", "reconstructed_val_knn_auc", "reconstructed_val_rf_auc"]


def run_val_fraction(ae_flags):
    """The --val_fraction the runs train with (their own validation cells, left out of the refit, as in a run)."""
    parts = shlex.split(ae_flags)
    for i, part in enumerate(parts):
        if part == "--val_fraction" and i + 1 < len(parts):
            return float(parts[i + 1])
        if part.startswith("--val_fraction="):
            return float(part.split("=", 1)[1])
    from guided_diffusion.training.config import AutoencoderTrainingConfig

    return AutoencoderTrainingConfig.val_fraction  # VAE_train.py's default


def train(args, fit, seed, folder):
    """One run of --max_steps steps that early stopping never ends (patience = the cap), a checkpoint every --every
    steps (an interrupted run is resumed from its newest checkpoint); returns {step: path} of its checkpoints."""
    started = glob.glob(os.path.join(folder, f"model_seed={seed}_step=*.pt"))
    if not os.path.isfile(os.path.join(folder, f"model_seed={seed}_step={args.max_steps}.pt")):
        start = ["--state_dict", folder] if started else ["--overwrite", "True"]
        run([sys.executable, "VAE/VAE_train.py", "--data_dir", fit, "--save_dir", folder,
             "--max_steps", str(args.max_steps), "--checkpoint_freq", str(args.every), "--log_interval", str(args.every),
             "--early_stopping_patience", str(args.max_steps), "--seed", str(seed), "--threads", str(args.threads),
             "--progress", "False"] + start + shlex.split(args.ae_flags), args.threads)
    paths = {}
    for path in glob.glob(os.path.join(folder, f"model_seed={seed}_step=*.pt")):
        paths[int(re.search(r"_step=(\d+)\.pt$", path).group(1))] = path
    return dict(sorted(paths.items()))


def validation_losses(folder):
    """{step: validation loss} from the run's train_log.csv."""
    losses = {}
    with open(os.path.join(folder, "train_log.csv")) as stream:
        for row in csv.DictReader(stream):
            if row.get("val_loss") not in (None, ""):
                losses[int(row["step"])] = float(row["val_loss"])
    return losses


def score_step(args, path, fit, seed, folder):
    """The realism figures of one checkpoint, its dispersion refitted on the run's own training cells first (a copy:
    the run's file stays as it was)."""
    from exp_script.evaluation.autoencoder_choice import realism_scores
    from guided_diffusion.data import load_dataset
    from guided_diffusion.data.batches import split_train_validation
    from VAE.autoencoder_training import apply_dispersion_refit

    os.makedirs(folder, exist_ok=True)
    copy = os.path.join(folder, "model.pt")
    shutil.copyfile(path, copy)
    dataset = load_dataset(fit, label_keys=[args.label_key], backed="auto", require_labels=False)
    try:
        train_index, _ = split_train_validation(dataset.n_cells, run_val_fraction(args.ae_flags), seed)
        apply_dispersion_refit(copy, dataset, train_index, seed)
    finally:
        dataset.close()
    return realism_scores(copy, fit, os.path.join(args.out, "split", "heldout.h5ad"), args.label_key, seed, folder)


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path) as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


def write_rows(path, rows):
    with open(path, "w") as stream:
        stream.write("\t".join(COLUMNS) + "\n")
        for row in rows:
            stream.write("\t".join(str(row[c]) for c in COLUMNS) + "\n")


def summary(rows):
    steps = sorted({int(r["step"]) for r in rows})
    keys = ["val_loss"] + SCORES + ["criterion"]
    lines = ["| step | " + " | ".join(keys) + " | seeds |", "|---" * (len(keys) + 2) + "|"]
    for step in steps:
        chosen = [r for r in rows if int(r["step"]) == step]
        cells = [mean_sd([float(r[k]) for r in chosen]) if k != "val_loss" else
                 f"{np.mean([float(r[k]) for r in chosen]):.5f}" for k in keys]
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {len(chosen)} |")
    lines += ["", "| seed | lowest validation loss: step / criterion | lowest criterion: step / criterion |",
              "|---|---|---|"]
    for seed in sorted({int(r["seed"]) for r in rows}):
        mine = [r for r in rows if int(r["seed"]) == seed]
        by_loss = min(mine, key=lambda r: float(r["val_loss"]))
        by_realism = min(mine, key=lambda r: float(r["criterion"]))
        lines.append(f"| {seed} | {by_loss['step']} / {float(by_loss['criterion']):.3f} | "
                     f"{by_realism['step']} / {float(by_realism['criterion']):.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="the training split (the held-out file is never given)")
    parser.add_argument("--label_key", default="cell_type1")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ae_flags", default="", help="flags every autoencoder run gets")
    parser.add_argument("--max_steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=250, help="steps between scored checkpoints")
    parser.add_argument("--val_fraction", type=float, default=0.15)
    parser.add_argument("--split_seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.every <= 0 or args.max_steps < args.every:
        parser.error("--every must be positive and at most --max_steps")
    args.fit_cells = 0
    os.makedirs(args.out, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    fit, _ = split(args)
    table = os.path.join(args.out, "steps.tsv")
    rows = read_rows(table)
    done = {(int(r["seed"]), int(r["step"])) for r in rows}
    for seed in args.seeds:
        folder = os.path.join(args.out, f"seed{seed}")
        start = time.time()
        checkpoints = train(args, fit, seed, folder)
        losses = validation_losses(folder)
        print(f"seed {seed}: {len(checkpoints)} checkpoints, trained in {time.time() - start:.0f} s", flush=True)
        for step, path in checkpoints.items():
            if (seed, step) in done:
                continue
            row = {"seed": seed, "step": step, "val_loss": losses.get(step, float("nan")),
                   **score_step(args, path, fit, seed, os.path.join(folder, f"scored_step{step}"))}
            row["criterion"] = float(np.mean([row[k] for k in SCORES]))
            rows.append(row)
            write_rows(table, rows)
            print({k: row[k] for k in ("seed", "step", "val_loss", "criterion")}, flush=True)
    text = summary(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as stream:
        stream.write(text)
    print(text)


if __name__ == "__main__":
    main()
