r"""Choose the guidance weight: sample a model at several --guide_w settings and score each against held-out
real cells for fidelity, label accuracy and diversity.

    python exp_script/guidance_sweep.py --model_path checkpoint/demo/diffusion/baron/model008000.pt \
        --validation held_out.h5ad --weights 0 0.5 1 2 cell_type1=1,donor=3 --out checkpoint/sweep

Each setting is sampled with every --seeds seed; per condition of the validation cells (their label
combinations the model knows) as many cells as the validation has, at most --max_per_condition. Scores:

- fidelity: kNN real-vs-generated AUC (exp_script.evaluation.metrics, 5-fold, on a PCA of the validation
  cells' most variable genes); 0.5 = indistinguishable.
- label accuracy: a classifier fitted on the validation cells (logistic regression on PCA,
  exp_script.evaluation.label_classifier) predicts the generated cells' --label_key; beside it, the
  validation cells' own out-of-fold accuracy.
- diversity: mean within-label distance between generated cells divided by the same for real cells (PCA space,
  fitted on one half of the validation cells, the real figure from the other half); below 1 = less varied than
  real cells.

Writes guidance_sweep.csv (one row per setting and seed), guidance_sweep.md (mean ± sd over seeds),
guidance_sweep.png, and prints the recommended setting with the rule that chose it (RULE below).

Unseen combinations (a two-key model trained without some combinations whose real cells are kept):

    python exp_script/guidance_sweep.py --model_path M --validation full.h5ad --out checkpoint/sweep_unseen \
        --unseen_weights cell_type1=0.5,donor=2 cell_type1=0.5,donor=4 cell_type1=0.5,donor=6 --record True

compares --unseen_guide_w settings on the validation cells' combinations the model never saw (or those named
by --unseen_condition), scoring as exp_script/unseen_combination.py does (a classifier of the second key
fitted on the real cells of the type; kNN AUC vs the real cells of the combination; the sampler's default
settings otherwise, the weights guiding the part of the noise schedule --unseen_guidance_interval names, default
0,0.5), writes unseen_sweep.csv / unseen_sweep.md and, with --record True, stores the chosen weights and that
interval in the checkpoint (and its EMA file): the sampler then uses them for every unseen combination unless
--unseen_guide_w is given (exp_script/evaluation/unseen_guidance.py, RULE there).
"""
import argparse
import os
import tempfile
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.metrics import pairwise_distances

from exp_script.evaluation.features import split_real
from exp_script.evaluation.guidance_inputs import align_to, generated_cells, read_cells
from exp_script.evaluation.label_classifier import fit_label_classifier, out_of_fold_labels, variable_genes
from exp_script.evaluation.metrics import knn_auc
from guided_diffusion.core.atomic import atomic_output
from guided_diffusion.cli import ArgumentParser, add_debug_arg, add_device_arg, command, positive_int, str2bool
from guided_diffusion.core.errors import UsageError
from guided_diffusion.core.device import resolve_device
from exp_script.evaluation import unseen_guidance
from guided_diffusion.checkpoints import load_diffusion_model, record_unseen_guidance, resolve_autoencoder
from guided_diffusion.sampling.settings import (SAMPLERS, UNSEEN_SOURCES, SamplerSettings, check_interval,
                                                check_weights, format_guide_w, parse_guide_w, parse_interval,
                                                resolve_guide_w, resolve_settings, resolve_unseen_guidance_interval)
from guided_diffusion.sampling.pipeline import generate

ACCURACY_TOLERANCE = 0.02
RULE = (f"the setting whose generated cells are hardest to tell from the validation cells (mean kNN AUC closest "
        f"to 0.5) among those whose mean label accuracy is within {ACCURACY_TOLERANCE} of the validation cells' "
        f"own out-of-fold accuracy or better; if none is, the setting with the highest label accuracy")
FILES = ("guidance_sweep.csv", "guidance_sweep.md", "guidance_sweep.png")


# ---- what to sample --------------------------------------------------------------------------------
def validation_plan(loaded, obs, max_per_condition):
    """[(code row, n_cells)] for the validation cells' label combinations the model knows, and the number of
    validation cells whose combination it does not know (left out of the comparison)."""
    keys, vocabularies = loaded.label_keys, loaded.vocabularies
    known = np.ones(len(obs), dtype=bool)
    for key in keys:
        known &= obs[key].isin(vocabularies[key]).to_numpy()
    if not known.any():
        raise UsageError(f"no validation cell has label values the model knows (label keys {', '.join(keys)})")
    groups = obs[known].groupby(keys, observed=True, sort=True).size()
    plan = []
    for combination, count in groups.items():
        combination = combination if isinstance(combination, tuple) else (combination,)
        row = [vocabularies[key].index(value) for key, value in zip(keys, combination)]
        plan.append((row, int(min(count, max_per_condition))))
    return plan, known


def sample_setting(loaded, autoencoder, plan, settings, work_dir):
    """Generate the plan with ``settings`` into ``work_dir``; returns (expression, genes, obs)."""
    path, _ = generate(loaded, autoencoder, plan, settings, work_dir, progress=False)
    return generated_cells(path, loaded.label_keys)


# ---- scores ----------------------------------------------------------------------------------------
def within_label_distance(features, labels):
    """Mean pairwise Euclidean distance between cells of the same label, averaged over labels (cell-weighted)."""
    labels = np.asarray(labels)
    total, weight = 0.0, 0
    for label in np.unique(labels):
        rows = features[labels == label]
        if len(rows) < 2:
            continue
        distances = pairwise_distances(rows)
        total += distances.sum() / (len(rows) * (len(rows) - 1)) * len(rows)
        weight += len(rows)
    return total / weight if weight else float("nan")


class Reference:
    """The validation cells as every setting is scored against them: PCA, label classifier, own figures."""

    def __init__(self, expression, labels, n_hvg=2000, n_pcs=30, seed=0):
        self.labels = np.asarray(labels)
        # the PCA is fitted on one half of the validation cells and the reference diversity measured on the other:
        # cells a PCA was fitted on spread more in it than any other cells (its components follow their own
        # noise), which made other real cells score ~0.6 against a reference of 1
        fit_half, diversity_half = split_real(self.labels, seed)
        self.columns = variable_genes(expression[fit_half], n_hvg)
        components = max(1, min(n_pcs, len(self.columns), len(fit_half) - 1))
        self.pca = PCA(n_components=components, random_state=seed).fit(expression[fit_half][:, self.columns])
        self.features = self.pca.transform(expression[:, self.columns])
        self.classifier = fit_label_classifier(expression, self.labels, n_hvg, n_pcs, seed)
        self.accuracy = float(np.mean(out_of_fold_labels(expression, self.labels, n_hvg, n_pcs, seed) == self.labels))
        self.diversity = within_label_distance(self.features[diversity_half], self.labels[diversity_half])
        self.seed = seed

    def score(self, expression, labels):
        features = self.pca.transform(expression[:, self.columns])
        return {"knn_auc": knn_auc(self.features, features, self.seed),
                "label_accuracy": float(np.mean(self.classifier.predict(expression) == np.asarray(labels))),
                "diversity_ratio": within_label_distance(features, labels) / self.diversity}


# ---- the choice ------------------------------------------------------------------------------------
def summarize(rows):
    """Mean and sd over seeds per setting, in the order the settings were given."""
    table = pd.DataFrame(rows)
    order = list(dict.fromkeys(table["guide_w"]))
    grouped = table.groupby("guide_w", sort=False)[["knn_auc", "label_accuracy", "diversity_ratio"]]
    summary = grouped.mean().join(grouped.std(ddof=0), rsuffix="_sd").loc[order]
    return summary.reset_index()


def recommend(summary, real_accuracy):
    """The row of ``summary`` RULE picks."""
    eligible = summary[summary["label_accuracy"] >= real_accuracy - ACCURACY_TOLERANCE]
    if len(eligible):
        return eligible.loc[(eligible["knn_auc"] - 0.5).abs().idxmin()]
    return summary.loc[summary["label_accuracy"].idxmax()]


def markdown(summary, real_accuracy, chosen):
    lines = ["| --guide_w | kNN AUC (0.5 best) | label accuracy | diversity (generated / real) |",
             "| --- | ---: | ---: | ---: |"]
    for _, row in summary.iterrows():
        mark = " **(recommended)**" if row["guide_w"] == chosen["guide_w"] else ""
        lines.append(f"| {row['guide_w']}{mark} | {row['knn_auc']:.3f} ± {row['knn_auc_sd']:.3f} | "
                     f"{row['label_accuracy']:.3f} ± {row['label_accuracy_sd']:.3f} | "
                     f"{row['diversity_ratio']:.3f} ± {row['diversity_ratio_sd']:.3f} |")
    lines += ["", f"Validation cells: out-of-fold label accuracy {real_accuracy:.3f}; diversity 1 = as varied as real cells.",
              f"Recommended: --guide_w {chosen['guide_w']} ({RULE})."]
    return "\n".join(lines) + "\n"


def plot(summary, real_accuracy, chosen):
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    positions = np.arange(len(summary))
    panels = [("knn_auc", "kNN AUC (0.5 = indistinguishable)", 0.5), ("label_accuracy", "label accuracy",
                                                                       real_accuracy),
              ("diversity_ratio", "diversity (generated / real)", 1.0)]
    for axis, (column, title, reference) in zip(axes, panels):
        axis.errorbar(positions, summary[column], yerr=summary[f"{column}_sd"], marker="o", capsize=3)
        axis.axhline(reference, color="grey", linestyle="--", linewidth=1, label="validation cells")
        axis.axvline(int(np.flatnonzero(summary["guide_w"] == chosen["guide_w"])[0]), color="tab:green", alpha=0.4,
                     label="recommended")
        axis.set_xticks(positions, summary["guide_w"], rotation=30, ha="right", fontsize=8)
        axis.set_title(title)
        axis.set_xlabel("--guide_w")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


# ---- the sweep -------------------------------------------------------------------------------------
def sweep(model_path, validation, weights, out, label_key=None, seeds=(0,), max_per_condition=100,
          input_is_log=False, vae_path="", timestep_respacing="50", device="auto", log=print, sampler=None):
    """Sample and score every (setting, seed); write the table, its summary and the plot; return both."""
    device = resolve_device(device)
    loaded = load_diffusion_model(model_path, device=device)
    label_key = label_key or loaded.label_keys[0]
    if label_key not in loaded.label_keys:
        raise UsageError(f"--label_key {label_key!r} is not a label key of this model; label keys: "
                         f"{', '.join(loaded.label_keys)}")
    settings_list = [replace(SamplerSettings(), guide_w=resolve_guide_w(w, loaded.label_keys), sampler=sampler,
                             timestep_respacing=timestep_respacing) for w in weights]
    settings_list = [resolve_settings(s, loaded.checkpoint.sampling_defaults, device,
                                      schedule_steps=int(loaded.checkpoint.diffusion["steps"])) for s in settings_list]
    autoencoder = resolve_autoencoder(loaded, vae_path, device)
    expression, genes, obs = read_cells(validation, loaded.label_keys, input_is_log=input_is_log)
    plan, known = validation_plan(loaded, obs, max_per_condition)
    reference = Reference(expression[known], obs[label_key].to_numpy()[known])
    log(f"validation: {int(known.sum())} cells in {len(plan)} conditions ({int((~known).sum())} of unknown labels "
        f"left out); out-of-fold label accuracy {reference.accuracy:.3f}")
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        for index, settings in enumerate(settings_list):
            for seed in seeds:
                generated, generated_genes, generated_obs = sample_setting(
                    loaded, autoencoder, plan, replace(settings, seed=seed), os.path.join(work_dir, f"{index}_{seed}"))
                scores = reference.score(align_to(generated_genes, generated, genes), generated_obs[label_key])
                rows.append({"guide_w": format_guide_w(settings.guide_w), "seed": seed, **scores})
                log(f"--guide_w {rows[-1]['guide_w']} seed {seed}: " + ", ".join(
                    f"{name} {value:.3f}" for name, value in scores.items()))
    table, summary = pd.DataFrame(rows), summarize(rows)
    chosen = recommend(summary, reference.accuracy)
    write_outputs(out, table, summary, reference.accuracy, chosen)
    log(f"recommended: --guide_w {chosen['guide_w']} (rule: {RULE})")
    return table, summary, chosen


def sweep_unseen(model_path, validation, weights, out, conditions=None, seeds=(0, 1), max_per_condition=100,
                 input_is_log=False, vae_path="", sampler=None, timestep_respacing=None, device="auto", record=False,
                 log=print, interval=None):
    """Sample every --unseen_guide_w setting on the validation combinations the model never saw, guided over
    ``interval`` of the noise schedule (default: the sampler's UNSEEN_GUIDANCE_INTERVAL), score them, write
    unseen_sweep.csv/.md, and with ``record`` store the chosen weights and the interval in the checkpoint; returns
    (table, summary, chosen row)."""
    interval = resolve_unseen_guidance_interval(interval)
    check_interval(interval)
    device = resolve_device(device)
    loaded = load_diffusion_model(model_path, device=device)
    keys = loaded.label_keys
    if len(keys) != 2:
        raise UsageError(f"--unseen_weights chooses the weights of a two-key model (cell type x donor); this model "
                         f"has {len(keys)} label key(s): {', '.join(keys)}")
    candidates = [unseen_guidance.as_weights(resolve_guide_w(w, keys), keys) for w in weights]
    for candidate in candidates:
        check_weights(candidate, "--unseen_weights")
    expression, genes, obs = read_cells(validation, keys, input_is_log=input_is_log)
    combinations = unseen_guidance.validation_combinations(loaded, obs, conditions)
    plan = [(row, int(min(count, max_per_condition))) for row, _, count in combinations]
    autoencoder = resolve_autoencoder(loaded, vae_path, device)
    base = replace(SamplerSettings(), sampler=sampler, unseen_guidance_interval=interval,
                   **({"timestep_respacing": timestep_respacing} if timestep_respacing else {}))
    log(f"validation combinations never seen in training: " + ", ".join(
        f"{', '.join(f'{k}={v}' for k, v in values.items())} ({count} cells)" for _, values, count in combinations))
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        for index, candidate in enumerate(candidates):
            settings = replace(base, unseen_guide_w=candidate, unseen_guide_w_source=UNSEEN_SOURCES["flag"])
            settings = resolve_settings(settings, loaded.checkpoint.sampling_defaults, device,
                                        schedule_steps=int(loaded.checkpoint.diffusion["steps"]))
            for seed in seeds:
                generated, generated_genes, generated_obs = sample_setting(
                    loaded, autoencoder, plan, replace(settings, seed=seed), os.path.join(work_dir, f"{index}_{seed}"))
                scores = unseen_guidance.score_combinations(
                    expression, obs, align_to(generated_genes, generated, genes), generated_obs, keys,
                    combinations, seed)
                for entry in scores:
                    rows.append({"unseen_guide_w": format_guide_w(candidate), "seed": seed, **entry})
                    log(f"--unseen_guide_w {rows[-1]['unseen_guide_w']} seed {seed} {entry['combination']}: called "
                        f"right {entry['called_right']:.3f} (real {entry['real_called_right']:.3f}), kNN AUC "
                        f"{entry['knn_auc']:.3f}")
    table, summary = pd.DataFrame(rows), unseen_guidance.summarize(rows)
    unseen_guidance.check_mean_finite(summary)
    chosen = unseen_guidance.recommend(summary)
    os.makedirs(out, exist_ok=True)
    with atomic_output(os.path.join(out, "unseen_sweep.md")) as temp_path, open(temp_path, "w") as stream:
        stream.write(unseen_guidance.markdown(summary, chosen, combinations))
    with atomic_output(os.path.join(out, "unseen_sweep.csv")) as temp_path:
        table.to_csv(temp_path, index=False)
    log(f"chosen: --unseen_guide_w {chosen['unseen_guide_w']} (rule: {unseen_guidance.RULE})")
    if record:
        weights = candidates[[format_guide_w(c) for c in candidates].index(chosen["unseen_guide_w"])]
        written = record_unseen_guidance(model_path, weights, unseen_guidance.choice_record(
            chosen, combinations, validation, seeds), interval=interval)
        log(f"recorded in {', '.join(written)}: the sampler uses these weights for unseen combinations by default")
    return table, summary, chosen


def write_outputs(out, table, summary, real_accuracy, chosen):
    os.makedirs(out, exist_ok=True)
    csv_path, md_path, png_path = (os.path.join(out, name) for name in FILES)
    figure = plot(summary, real_accuracy, chosen)
    with atomic_output(png_path) as temp_path:
        figure.savefig(temp_path, dpi=120, format="png")
    plt.close(figure)
    with atomic_output(md_path) as temp_path, open(temp_path, "w") as stream:
        stream.write(markdown(summary, real_accuracy, chosen))
    with atomic_output(csv_path) as temp_path:
        table.to_csv(temp_path, index=False)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="model{step}.pt from cell_train.py (EMA weights used)")
    parser.add_argument("--validation", required=True, help="held-out real cells (.h5ad, raw counts by default)")
    parser.add_argument("--weights", nargs="+", type=parse_guide_w, default=None, metavar="W|KEY=W[,KEY=W]",
                        help="the --guide_w settings to compare, e.g. 0 0.5 1 2 cell_type1=1,donor=3")
    parser.add_argument("--unseen_weights", nargs="+", type=parse_guide_w, default=None, metavar="W|KEY=W[,KEY=W]",
                        help="instead of --weights: the --unseen_guide_w settings to compare on the validation "
                             "cells' combinations the model never saw in training (two-key models), e.g. "
                             "cell_type1=0.5,donor=2 cell_type1=0.5,donor=4")
    parser.add_argument("--unseen_condition", action="append", default=None, metavar="KEY=VALUE,KEY=VALUE",
                        help="with --unseen_weights: choose on this unseen combination only (repeatable; default: "
                             "every one in the validation cells)")
    parser.add_argument("--unseen_guidance_interval", type=parse_interval, default=None, metavar="LO,HI",
                        help="with --unseen_weights: the part of the noise schedule the weights guide (as "
                             "cell_sample.py's flag; default 0,0.5), recorded with the chosen weights")
    parser.add_argument("--record", type=str2bool, default=False,
                        help="with --unseen_weights: store the chosen weights in the checkpoint (and its EMA file), "
                             "where the sampler takes them by default for unseen combinations")
    parser.add_argument("--out", required=True, help="folder for guidance_sweep.csv/.md/.png")
    parser.add_argument("--label_key", default=None, help="the key whose label accuracy is scored (default: the "
                                                          "model's first)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds per setting")
    parser.add_argument("--max_per_condition", type=positive_int, default=100,
                        help="generated cells per condition: the validation's count, at most this")
    parser.add_argument("--input_is_log", type=str2bool, default=False, help="the validation X is log-normalized")
    parser.add_argument("--vae_path", default="", help="autoencoder (default: the one recorded in the checkpoint)")
    parser.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                        help="the reverse process (as cell_sample.py); default: ddpm, dpmpp2m_sde on logsnrN steps")
    parser.add_argument("--timestep_respacing", default=None,
                        help="sampling steps (as cell_sample.py); default 50, with --unseen_weights the sampler's")
    add_device_arg(parser)
    add_debug_arg(parser)
    return parser


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    if (args.weights is None) == (args.unseen_weights is None):
        raise UsageError("give either --weights (guidance of seen conditions) or --unseen_weights (of combinations "
                         "never seen in training)")
    if args.unseen_weights is None and (args.record or args.unseen_condition or args.unseen_guidance_interval):
        raise UsageError("--record, --unseen_condition and --unseen_guidance_interval go with --unseen_weights")
    if args.unseen_weights is not None:
        return sweep_unseen(args.model_path, args.validation, args.unseen_weights, args.out,
                            conditions=args.unseen_condition, seeds=args.seeds,
                            max_per_condition=args.max_per_condition, input_is_log=args.input_is_log,
                            vae_path=args.vae_path, sampler=args.sampler, timestep_respacing=args.timestep_respacing,
                            device=args.device, record=args.record, interval=args.unseen_guidance_interval)
    return sweep(args.model_path, args.validation, args.weights, args.out, label_key=args.label_key,
                 seeds=args.seeds, max_per_condition=args.max_per_condition, input_is_log=args.input_is_log,
                 vae_path=args.vae_path, timestep_respacing=args.timestep_respacing or "50", device=args.device,
                 sampler=args.sampler)


if __name__ == "__main__":
    main()
