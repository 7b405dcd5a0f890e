"""Choose an autoencoder recipe on validation cells inside the training data: exp_script/choose_autoencoder.py.

The training cells are split once (stratified by label) into fitting cells and validation cells. Every candidate
(a set of `VAE/VAE_train.py` flags) is trained on the fitting cells with each seed; the fitting cells' own latents
decoded with drawn counts (what a perfect latent model through this decoder gives) and the validation cells'
reconstructions are scored against the validation cells with the evaluation's kNN and RF two-sample AUCs
(:func:`exp_script.evaluation.metrics.expression_two_sample`). The candidate with the lowest mean of those four
AUCs over the seeds wins (RULE); it is then trained on every given cell. Held-out cells are never read: give this
the training split only.
"""
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from guided_diffusion.core.atomic import atomic_output
from guided_diffusion.core.errors import UsageError, settings_worded_as_flags

RULE = ("lowest mean over seeds of four AUCs against the validation cells (kNN and RF; the fitting cells' decoded "
        "latents and the validation cells' reconstructions); a tie goes to the candidate listed first")
# the batch-size candidate keeps the shared settings' number of epochs: its step cap, checkpoint interval and patience
# are the shared ones times (the shared batch size / 32); with the CLI's shared defaults (batch 128, cap 3000,
# patience 300) that is --max_steps 12000 --checkpoint_freq 12000 --early_stopping_patience 1200
# the variational candidate is scVI-like (a 30-d Gaussian posterior, the full evidence lower bound, dropout), with the
# longer patience its noisier validation loss needs and twice the shared step cap and checkpoint interval, so that
# the longer patience is not cut short by the cap (at the CLI's defaults --max_steps 6000 --checkpoint_freq 6000)
DEFAULT_CANDIDATES = {
    "default": "",
    "batch32": "--batch_size 32",
    "vae": "--latent_dim 30 --kl_weight 1 --dropout 0.1 --early_stopping_patience 1000",
}
SMALL_BATCH = 32
SCALED_WITH_BATCH = ("max_steps", "checkpoint_freq", "early_stopping_patience")
LONGER_CAP = 2  # the variational candidate's step cap and checkpoint interval, times the shared ones
SCALED_CAP = ("max_steps", "checkpoint_freq")
SCORES = ("decoded_fit_knn_auc", "decoded_fit_rf_auc", "reconstructed_val_knn_auc", "reconstructed_val_rf_auc")
COLUMNS = ("candidate", "seed", "flags", "best_step", "train_seconds", "control_knn_auc", "control_rf_auc") + SCORES
OWNED_FLAGS = ("--data_dir", "--save_dir", "--seed", "--state_dict", "--init_from", "--overwrite", "--threads")


@dataclass
class Choice:
    chosen: str
    flags: str
    scores: Dict[str, float]  # candidate -> criterion (mean of the four AUCs over the seeds)
    rows: List[dict] = field(default_factory=list)
    final_path: Optional[str] = None
    capped: List[str] = field(default_factory=list)  # "NAME seed S" of the runs the step cap ended


def default_candidate_flags(name, shared=()):
    """The flags of the default candidate ``name`` given the ``shared`` flags (``batch32``: a batch of 32 for the
    same number of epochs as the shared settings, see SCALED_WITH_BATCH; ``vae``: LONGER_CAP times the shared step
    cap and checkpoint interval, room for its longer patience)."""
    flags = DEFAULT_CANDIDATES[name]
    if name not in ("batch32", "vae"):
        return flags
    _, _, training = autoencoder_configs(["--data_dir", "-", "--save_dir", "-"] + list(shared), "shared flags")
    if name == "batch32":
        factor, keys = training.batch_size / SMALL_BATCH, SCALED_WITH_BATCH
    else:
        factor, keys = LONGER_CAP, SCALED_CAP
    scaled = " ".join(f"--{key} {max(1, round(getattr(training, key) * factor))}" for key in keys)
    return f"{flags} {scaled}"


def parse_candidates(texts, shared=()):
    """{name: flags} of ``name=--flag value ...`` texts (a name from DEFAULT_CANDIDATES alone: its flags, given the
    ``shared`` flags: :func:`default_candidate_flags`). Names are unique, made of letters, digits, ``.``, ``-``,
    ``_``."""
    candidates = {}
    for text in texts:
        name, sep, flags = text.partition("=")
        name = name.strip()
        if not name or not all(c.isalnum() or c in "._-" for c in name):
            raise UsageError(f"a candidate is NAME or NAME=FLAGS with a name of letters, digits, '.', '-', '_'; "
                             f"got {text!r}")
        if not sep:
            if name not in DEFAULT_CANDIDATES:
                raise UsageError(f"candidate {name!r} has no flags; give {name}=--flag value ... (known without "
                                 f"flags: {', '.join(DEFAULT_CANDIDATES)})")
            flags = default_candidate_flags(name, shared)
        if name in candidates:
            raise UsageError(f"candidate {name!r} is given twice")
        candidates[name] = flags.strip()
    if len(candidates) < 2:
        raise UsageError(f"give at least two candidates to choose between, got {len(candidates)}")
    return candidates


def check_flags(parts, what):
    """Refuse the flags the choice sets itself (OWNED_FLAGS) among a candidate's or the shared flags."""
    for flag in OWNED_FLAGS:
        if any(part == flag or part.startswith(flag + "=") for part in parts):
            hint = " (--seeds gives the training seeds)" if flag == "--seed" else ""
            raise UsageError(f"{what}: {flag} is set by the choice itself; leave it out{hint}")


def autoencoder_configs(argv, what):
    """(data, model, training) configs of `VAE/VAE_train.py` flags ``argv``; a bad flag is a UsageError naming
    ``what``."""
    from guided_diffusion.training.config import (AutoencoderModelConfig, AutoencoderTrainingConfig, DataConfig,
                                                  from_flags)
    from VAE.VAE_train import build_parser

    parser = build_parser()

    def refuse(message):
        raise UsageError(f"{what}: {message}")

    parser.error = refuse
    args = parser.parse_args(argv)
    return from_flags(DataConfig, args), from_flags(AutoencoderModelConfig, args), from_flags(
        AutoencoderTrainingConfig, args)


def train(data_path, save_dir, seed, flags, shared, progress, what):
    """Train one autoencoder (`VAE/VAE_train.py` flags ``shared`` then ``flags``); returns (best-weights path,
    seconds). A finished run's best-weights file is reused."""
    from VAE.autoencoder_checkpoint import best_model_path
    from VAE.autoencoder_training import train_autoencoder

    path = best_model_path(save_dir, seed)
    done = os.path.join(save_dir, "done.json")
    given = list(shared) + shlex.split(flags)
    record = finished_run(save_dir)
    if os.path.isfile(path) and record is not None:
        if record.get("flags") != given:
            recorded = " ".join(record.get("flags", []))
            raise UsageError(f"{save_dir} holds an autoencoder trained with other flags ({recorded}); use another "
                             f"save_dir")
        return path, record["seconds"]
    argv = ["--data_dir", data_path, "--save_dir", save_dir, "--seed", str(seed), "--progress", str(progress),
            "--overwrite", "True"] + given
    configs = autoencoder_configs(argv, what)
    with settings_worded_as_flags():
        _, _, seconds = train_autoencoder(*configs)
    with atomic_output(done) as temporary, open(temporary, "w") as stream:
        json.dump({"seconds": seconds, "flags": given}, stream)
    return path, seconds


def finished_run(save_dir):
    """The record (``seconds``, ``flags``) of the finished run in ``save_dir``, or None."""
    done = os.path.join(save_dir, "done.json")
    if not os.path.isfile(done):
        return None
    with open(done) as stream:
        return json.load(stream)


def set_aside_final(folder, flags):
    """When ``folder`` holds a finished final run trained with other flags than ``flags`` (an earlier choice's winner,
    before candidates were added), rename it to ``folder``_previous (then _previous2, ...) so that nothing trained is
    lost; returns the new path, or None when nothing was moved."""
    record = finished_run(folder)
    if record is None or record.get("flags") == flags:
        return None
    target = previous_name(folder, os.path.exists)
    os.rename(folder, target)
    return target


def previous_name(name, taken):
    """``name``_previous, else ``name``_previous2, _previous3, ...: the first for which ``taken(candidate)`` is
    false (where something set aside goes)."""
    target, number = f"{name}_previous", 1
    while taken(target):
        number += 1
        target = f"{name}_previous{number}"
    return target


def set_aside_changed_defaults(save_dir, rows, candidates, shared=(), log=print):
    """Runs in ``rows`` of a default candidate named alone (its flags those of :func:`default_candidate_flags`) that
    were trained with other flags (the candidate's defaults changed since) are renamed NAME_previous (then
    NAME_previous2, ...), their rows and SAVE_DIR/candidates folders alike, so the candidate trains afresh and nothing
    trained is lost. Changes ``rows`` in place; returns {old name: new name}."""
    renamed = {}
    taken = set(candidates) | {row["candidate"] for row in rows}
    for name, flags in candidates.items():
        if name not in DEFAULT_CANDIDATES or flags != default_candidate_flags(name, shared):
            continue
        earlier = [row for row in rows if row["candidate"] == name and row["flags"] != flags]
        if not earlier:
            continue
        target = previous_name(name, lambda new: new in taken or any(
            os.path.exists(os.path.join(save_dir, "candidates", f"{new}_seed{row['seed']}")) for row in earlier))
        taken.add(target)
        for row in earlier:
            folder = os.path.join(save_dir, "candidates", f"{name}_seed{row['seed']}")
            if os.path.isdir(folder):
                os.rename(folder, os.path.join(save_dir, "candidates", f"{target}_seed{row['seed']}"))
            row["candidate"] = target
        renamed[name] = target
        if log:
            log(f"candidate {name}'s defaults changed since its runs in {save_dir} ({earlier[0]['flags']}); those "
                f"runs are kept as {target} and {name} is trained again")
    return renamed


def realism_scores(vae_path, fit_path, val_path, label_key, seed, folder):
    """kNN and RF AUCs against the validation cells of the fitting cells' decoded latents (``decoded_fit``), the
    validation cells' reconstructions (``reconstructed_val``), both with counts drawn at each cell's library size,
    and of the fitting cells themselves (``control``)."""
    from exp_script.evaluation import metrics, reconstruction
    from exp_script.evaluation.inputs import read_set
    from guided_diffusion.data import load_dataset
    from VAE.VAE_model import load_autoencoder

    sets = {}
    for name, source in (("decoded_fit", fit_path), ("reconstructed_val", val_path)):
        path = os.path.join(folder, f"{name}.h5ad")
        autoencoder, _ = load_autoencoder(vae_path)
        dataset = load_dataset(source, label_keys=[label_key], backed="auto")
        reconstruction.reconstruct(autoencoder, dataset, path, observation="counts", seed=seed, progress=False,
                                   data_path=source, vae_path=vae_path)
        sets[name], _ = read_set(path, label_key, name)
    reference, genes = read_set(val_path, label_key, "validation")
    sets["control"], _ = read_set(fit_path, label_key, "fitting")
    row = {}
    for name, cells in sets.items():
        result = metrics.expression_two_sample(reference.x, reference.labels, cells.x, cells.labels, genes,
                                               seed=seed, use_rf=True)["overall"]
        row[f"{name}_knn_auc"], row[f"{name}_rf_auc"] = result["knn_auc"], result["rf_auc"]
    return row


def capped_runs(rows, limits):
    """["NAME seed S", ...] of the runs whose best step came later than their --max_steps less their patience: early
    stopping did not end them, the step cap did, so their best weights may still have been improving."""
    capped = []
    for row in rows:
        max_steps, patience = limits[row["candidate"]]
        if int(row["best_step"]) + patience > max_steps:
            capped.append(f"{row['candidate']} seed {row['seed']}")
    return capped


def capped_text(capped):
    return (f"{', '.join(capped)} reached --max_steps before early stopping ended the run (the best weights may "
            f"still have been improving); raise --max_steps (and --checkpoint_freq) for this dataset")


def criterion(rows):
    """{candidate: mean over its rows of the mean of the four SCORES}."""
    names = list(dict.fromkeys(row["candidate"] for row in rows))
    return {name: float(np.mean([[float(row[key]) for key in SCORES] for row in rows if row["candidate"] == name]))
            for name in names}


def pick(scores):
    """The candidate with the lowest criterion; the first listed among equals."""
    return min(scores, key=lambda name: (scores[name], list(scores).index(name)))


def read_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path) as stream:
        lines = stream.read().splitlines()
    return [dict(zip(COLUMNS, line.split("\t"))) for line in lines[1:] if line]


def write_rows(path, rows):
    with atomic_output(path) as temporary, open(temporary, "w") as stream:
        stream.write("\t".join(COLUMNS) + "\n")
        stream.writelines("\t".join(str(row[c]) for c in COLUMNS) + "\n" for row in rows)


def summary(rows, scores, chosen, candidates):
    lines = ["| candidate | flags | " + " | ".join(SCORES) + " | criterion | seeds |", "|---" * (len(SCORES) + 4) + "|"]
    for name in scores:
        chosen_rows = [row for row in rows if row["candidate"] == name]
        cells = []
        for key in SCORES:
            values = np.array([float(row[key]) for row in chosen_rows])
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.3f} ± {spread:.3f}")
        mark = " (chosen)" if name == chosen else ""
        lines.append(f"| {name}{mark} | `{candidates[name] or '(defaults)'}` | " + " | ".join(cells)
                     + f" | {scores[name]:.3f} | {len(chosen_rows)} |")
    return "\n".join(lines) + f"\n\nrule: {RULE}\n"


def choose_autoencoder(data_path, label_key, save_dir, candidates, shared_flags=(), seeds=(0, 1),
                       val_fraction=0.15, split_seed=1, final=True, progress=True, log=print):
    """Train every candidate on the fitting cells of ``data_path`` with every seed, score it on the validation
    cells, choose by RULE and (``final``) train the winner on all of ``data_path`` with the first seed into
    SAVE_DIR/final. Writes SAVE_DIR/split (fitting and validation cells), SAVE_DIR/candidates/NAME_seedS,
    choice.tsv (one row per run; runs already in it are reused), choice.md and choice.json. Returns a Choice."""
    from exp_script.evaluation.heldout_split import split_file
    from VAE.autoencoder_checkpoint import AutoencoderCheckpoint

    if not seeds:
        raise UsageError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds repeat: {' '.join(map(str, seeds))}")
    shared = list(shared_flags)
    check_flags(shared, "shared flags")
    limits = {}  # candidate -> (max_steps, early_stopping_patience)
    for name, flags in candidates.items():  # every flag checked before anything trains
        check_flags(shlex.split(flags), f"candidate {name}")
        configs = autoencoder_configs(["--data_dir", data_path, "--save_dir", save_dir] + shared + shlex.split(flags),
                                      f"candidate {name}")
        try:
            with settings_worded_as_flags():
                for config in configs:
                    config.validate()
        except UsageError as error:
            raise UsageError(f"candidate {name}: {error}") from None
        if not configs[2].early_stopping_patience:
            raise UsageError(f"candidate {name}: the choice reads each run's early-stopped weights; give "
                             f"--early_stopping_patience (e.g. 300) among the shared flags")
        limits[name] = (configs[2].max_steps, configs[2].early_stopping_patience)
    os.makedirs(save_dir, exist_ok=True)
    split_dir = os.path.join(save_dir, "split")
    fit_path, val_path = os.path.join(split_dir, "train.h5ad"), os.path.join(split_dir, "heldout.h5ad")
    if not (os.path.isfile(fit_path) and os.path.isfile(val_path)):
        split_file(data_path, split_dir, label_key, val_fraction, split_seed)
    table = os.path.join(save_dir, "choice.tsv")
    rows = read_rows(table)
    if set_aside_changed_defaults(save_dir, rows, candidates, shared, log):
        write_rows(table, rows)
    for row in rows:
        if row["candidate"] in candidates and row["flags"] != candidates[row["candidate"]]:
            raise UsageError(f"candidate {row['candidate']!r} was run in {save_dir} with other flags "
                             f"({row['flags'] or '(defaults)'}); give it another name or use another save_dir")
    done = {(row["candidate"], int(row["seed"])) for row in rows}
    for seed in seeds:
        for name, flags in candidates.items():
            if (name, seed) in done:
                continue
            folder = os.path.join(save_dir, "candidates", f"{name}_seed{seed}")
            path, seconds = train(fit_path, folder, seed, flags, shared, False, f"candidate {name}")
            row = {"candidate": name, "seed": seed, "flags": flags, "best_step": AutoencoderCheckpoint.load(path).step,
                   "train_seconds": round(float(seconds), 1),
                   **realism_scores(path, fit_path, val_path, label_key, seed, folder)}
            rows.append(row)
            write_rows(table, rows)
            if log:
                log(f"{name} seed {seed}: decoded fitting latents kNN / RF {row['decoded_fit_knn_auc']:.3f} / "
                    f"{row['decoded_fit_rf_auc']:.3f}, reconstructed validation cells "
                    f"{row['reconstructed_val_knn_auc']:.3f} / {row['reconstructed_val_rf_auc']:.3f}")
    used = [row for row in rows if row["candidate"] in candidates and int(row["seed"]) in seeds]
    scores = criterion(sorted(used, key=lambda row: list(candidates).index(row["candidate"])))
    chosen = pick(scores)
    capped = capped_runs(used, limits)
    result = Choice(chosen=chosen, flags=candidates[chosen], scores=scores, rows=used, capped=capped)
    if capped and log:
        log(f"warning: {capped_text(capped)}")
    with atomic_output(os.path.join(save_dir, "choice.md")) as temporary, open(temporary, "w") as stream:
        stream.write(summary(used, scores, chosen, candidates))
        if capped:
            stream.write(f"\nwarning: {capped_text(capped)}\n")
    if final:
        folder = os.path.join(save_dir, "final")
        moved = set_aside_final(folder, list(shared) + shlex.split(candidates[chosen]))
        if moved and log:
            log(f"{folder} held the final autoencoder of an earlier choice (other flags); moved to {moved}")
        result.final_path, _ = train(data_path, folder, seeds[0], candidates[chosen], shared, progress,
                                     f"candidate {chosen}")
        final_row = {"candidate": chosen, "seed": f"{seeds[0]} (final)",
                     "best_step": AutoencoderCheckpoint.load(result.final_path).step}
        if capped_runs([final_row], limits):
            result.capped.append(f"{chosen} seed {seeds[0]} (final)")
            if log:
                log(f"warning: {capped_text(result.capped[-1:])}")
    record = {"chosen": chosen, "flags": candidates[chosen], "shared_flags": shared, "criterion": scores,
              "rule": RULE, "seeds": list(seeds), "val_fraction": val_fraction, "split_seed": split_seed,
              "label_key": label_key, "final_path": result.final_path, "capped_runs": capped}
    with atomic_output(os.path.join(save_dir, "choice.json")) as temporary, open(temporary, "w") as stream:
        json.dump(record, stream, indent=1)
    return result
