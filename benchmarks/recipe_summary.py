"""Summary of ``benchmarks/bench_recipes.sh``: per recipe, the held-out figures as mean ± sd over training
seeds, beside the positive control (training cells vs held-out), with the novelty check and the stage times.

    python -m benchmarks.recipe_summary checkpoint/recipes --patience 150 --ae_steps 600
"""
import csv
import glob
import json
import os
import re
import statistics

from guided_diffusion.cli import ArgumentParser, HelpFormatter, command

FIGURES = ["knn_auc", "rf_auc", "ilisi", "celltypist_accuracy", "de_lfc_pearson", "marker_jaccard"]
COLUMNS = FIGURES + ["labels_not_below_collapsed", "novelty_fraction_closer", "novelty_distance_ratio", "tstr_macro_f1", "decoded_train_knn_auc",
                     "gap_control_knn_auc"]


def run_figures(metrics):
    """The figures of one evaluation: the generated cells' and the positive control's."""
    generated = dict(metrics["generated"]["overall"])
    novelty = metrics["novelty"]["sections"]["generated"]
    generated["novelty_fraction_closer"] = novelty["fraction_closer"]
    generated["novelty_distance_ratio"] = novelty["distance_ratio"]
    generated["novelty_passes"] = novelty["passes"]
    useful = metrics.get("usefulness", {}).get("train_on_synthetic", {})
    generated["tstr_macro_f1"] = useful.get("generated", {}).get("macro_f1")
    generated["labels_not_below_collapsed"] = labels_not_below_collapsed(metrics)
    control = dict(metrics["train_vs_heldout"]["overall"])
    control["tstr_macro_f1"] = useful.get("real training cells", {}).get("macro_f1")
    return generated, control


def labels_not_below_collapsed(metrics, min_heldout=10):
    """How many labels with at least ``min_heldout`` held-out cells (both halves: the reference and the held-out
    control) have a generated kNN AUC not below the collapsed control's (None without the controls)."""
    collapsed = metrics.get("collapsed", {}).get("per_label")
    if not collapsed:
        return None
    control = metrics.get("real_vs_real", {}).get("per_label", {})
    failing = 0
    for label, figures in metrics["generated"]["per_label"].items():
        heldout = figures.get("n_reference", 0) + control.get(label, {}).get("n_compared", 0)
        if heldout >= min_heldout and label in collapsed:
            failing += int(not figures["knn_auc"] < collapsed[label]["knn_auc"])
    return failing


def best_step(log_path):
    """The step of the lowest validation loss in an autoencoder's train_log.csv."""
    with open(log_path, newline="") as stream:
        rows = [row for row in csv.DictReader(stream) if row["val_loss"]]
    return int(min(rows, key=lambda row: float(row["val_loss"]))["step"])


def stage_seconds(times_path):
    if not os.path.exists(times_path):
        return {}
    with open(times_path) as stream:
        return {name: float(seconds) for name, seconds in (line.rstrip("\n").split("\t") for line in stream if line.strip())}


def mean_sd(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def novelty_passes(runs):
    """'k/n': how many of the runs' generated cells pass the novelty check."""
    return f"{sum(bool(figures['novelty_passes']) for figures in runs)}/{len(runs)}"


def figures_cells(runs, columns):
    """The mean ± sd of each column over ``runs`` (dicts of figures), as table cells joined by ' | '."""
    return " | ".join(mean_sd([figures.get(k) for figures in runs]) for k in columns)


def write_table(out, lines):
    """Write the table's lines to OUT/summary.md, print it and return its text."""
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as stream:
        stream.write(text)
    print(text)
    return text


def summarize(out, patience, ae_steps):
    recipes, controls, autoencoder = {}, {}, {}  # controls: one per seed (the same cells for every recipe)
    for seed_folder in sorted(glob.glob(os.path.join(out, "seed*"))):
        seed = seed_folder.rsplit("seed", 1)[1]
        log = os.path.join(seed_folder, "autoencoder", "train_log.csv")
        times = stage_seconds(os.path.join(seed_folder, "times.tsv"))
        if os.path.exists(log):
            autoencoder[seed] = str(best_step(log))
        for variant_log in sorted(glob.glob(os.path.join(seed_folder, "autoencoder_*", "train_log.csv"))):
            variant = os.path.basename(os.path.dirname(variant_log)).split("_", 1)[1]
            autoencoder[seed] = f"{autoencoder.get(seed, '—')}, {variant} {best_step(variant_log)}"
        for metrics_path in sorted(glob.glob(os.path.join(seed_folder, "*_d*", "evaluation", "metrics.json"))):
            recipe = os.path.basename(os.path.dirname(os.path.dirname(metrics_path)))
            with open(metrics_path) as stream:
                generated, control = run_figures(json.load(stream))
            generated["diffusion_seconds"] = times.get(f"diffusion {recipe}")
            gap_path = os.path.join(os.path.dirname(os.path.dirname(metrics_path)), "gap", "gap_analysis.json")
            if os.path.exists(gap_path):  # GAP=1: decoded training latents and the control, against all held-out cells
                with open(gap_path) as stream:
                    expression = json.load(stream)["expression"]
                generated["decoded_train_knn_auc"] = expression["reconstructed_train_counts"]["overall"]["knn_auc"]
                generated["gap_control_knn_auc"] = expression["train"]["overall"]["knn_auc"]
            recipes.setdefault(recipe, []).append((seed, generated))
            controls.setdefault(seed, control)
    lines = [f"Held-out protocol, {len(autoencoder)} training seed(s); autoencoder best steps by validation loss: "
             + ", ".join(f"seed {s}: {step}" for s, step in sorted(autoencoder.items()))
             + f" (an early-stopped run with patience {patience} stops at best + {patience}; `last` = {ae_steps} steps)",
             "", "| recipe | seeds | " + " | ".join(COLUMNS) + " | novelty passes | diffusion s |",
             "|" + "---|" * (len(COLUMNS) + 4)]
    lines.append("| train vs held-out (positive control) | " + str(len(controls)) + " | "
                 + " | ".join(mean_sd([c.get(k) for c in controls.values()]) if k in FIGURES + ["tstr_macro_f1"] else "—"
                              for k in COLUMNS) + " | — | — |")
    order = sorted(recipes, key=lambda name: (not name.startswith("last"), int(re.sub(r"\D", "", name) or 0)))
    for recipe in order:
        runs = [figures for _, figures in recipes[recipe]]
        lines.append(f"| {recipe} | {len(runs)} | {figures_cells(runs, COLUMNS)} | {novelty_passes(runs)} | "
                     f"{mean_sd([f.get('diffusion_seconds') for f in runs], digits=0)} |")
    return write_table(out, lines)


@command
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out", help="the folder bench_recipes.sh wrote")
    parser.add_argument("--patience", type=int, default=150, help="early-stopping patience to report")
    parser.add_argument("--ae_steps", type=int, default=600, help="the autoencoder run's steps")
    args = parser.parse_args(argv)
    summarize(args.out, args.patience, args.ae_steps)


if __name__ == "__main__":
    main()
