"""The tables of benchmarks/bench_fidelity.sh: one TSV row per run, then the per-configuration summary.

    python benchmarks/fidelity_table.py row RUN_DIR DATASET CONFIGURATION SEED METRIC...
    python benchmarks/fidelity_table.py summary fidelity.tsv OUT_DIR METRIC...

``row`` reads RUN_DIR/evaluation/metrics.json (the generated cells against the held-out cells) and
RUN_DIR/sample_seconds; ``summary`` prints mean ± sd over seeds per configuration, the positive control
(training cells vs held-out cells, read from the runs' metrics.json), the difference to the faithful
configuration with the acceptance rule, and the sampling time of each configuration relative to the
default (median over seeds of the per-seed ratio; the configurations of one seed run back to back).
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from guided_diffusion.sampling.settings import DEFAULT_SETTINGS

# acceptance: the configuration's mean minus the faithful configuration's mean, per metric
LIMITS = {"knn_auc": ("<=", 0.03), "scc": (">=", -0.003), "celltypist_accuracy": (">=", -0.02)}
CONTROL = "control: training vs held-out"


def overall(metrics_file, section):
    return json.loads(Path(metrics_file).read_text())[section]["overall"]


def row(run, dataset, configuration, seed, metrics):
    run = Path(run)
    figures = overall(run / "evaluation" / "metrics.json", "generated")
    start, end = (float(value) for value in (run / "sample_seconds").read_text().split())
    cells = json.loads((run / "evaluation" / "metrics.json").read_text())["split"]["generated_cells_total"]
    print("\t".join([dataset, configuration, seed, f"{end - start:.2f}", str(cells)]
                    + [f"{figures[name]:.4f}" for name in metrics]))


def network_evaluations(configuration):
    """Denoiser evaluations per cell (a guided step evaluates the conditional and unconditional branches
    in one batch): the step count of the configuration; "default" is cell_sample.py's default, and so are the
    denoiser steps of "decoder_fp32" (the default with an fp32 decoder)."""
    if configuration in ("default", "decoder_fp32"):
        return int(re.fullmatch(r"(?:logsnr|ddim)?([0-9]+)", DEFAULT_SETTINGS.timestep_respacing).group(1))
    if configuration == "faithful":
        return 1000
    match = re.search(r"(?:logsnr|ddim|ddpm)([0-9]+)", configuration)
    return int(match.group(1)) if match else None


def mean_sd(values):
    values = np.asarray(values, dtype=float)
    sd = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():.4f} ± {sd:.4f}" if np.isfinite(sd) else f"{values.mean():.4f}"


def summary(results, out, metrics):
    table = pd.read_csv(results, sep="\t", keep_default_na=False)
    table["seed"] = table["seed"].astype(str)
    for dataset, runs in table.groupby("dataset", sort=False):
        configurations = list(dict.fromkeys(runs["configuration"]))
        seconds = runs.pivot(index="seed", columns="configuration", values="sample_seconds")
        lines = []
        for configuration in configurations:
            chosen = runs[runs["configuration"] == configuration]
            ratio = (seconds["default"] / seconds[configuration]).median() if "default" in seconds else float("nan")
            lines.append([configuration, str(network_evaluations(configuration)), str(len(chosen)),
                          f"{chosen['sample_seconds'].median():.1f}", f"{ratio:.2f}x"]
                         + [mean_sd(chosen[name]) for name in metrics])
        run_dirs = sorted(Path(out, dataset, "runs").glob("*/evaluation/metrics.json"))
        if run_dirs:
            control = overall(run_dirs[0], "train_vs_heldout")
            lines.append([CONTROL, "", "", "", ""] + [f"{control[name]:.4f}" for name in metrics if name in control])
        header = ["configuration", "NFE", "seeds", "sample s (median)", "speed vs default"] + list(metrics)
        print(f"{dataset}: mean ± sd over sampling seeds, generated vs held-out cells "
              f"({runs['cells'].iloc[0]} generated cells per run)")
        print(pd.DataFrame(lines, columns=header).to_string(index=False))
        print()
        if "faithful" not in configurations:
            continue
        means = runs.groupby("configuration")[list(LIMITS)].mean()
        delta = means - means.loc["faithful"]
        print(f"{dataset}: difference to faithful (limits: kNN AUC <= +0.03, SCC >= -0.003, CellTypist >= -0.02)")
        for configuration in configurations:
            checks = []
            for name, (sense, limit) in LIMITS.items():
                value = delta.loc[configuration, name]
                ok = value <= limit if sense == "<=" else value >= limit
                checks.append(f"{name} {value:+.4f}{'' if ok else ' (fails)'}")
            passed = all("fails" not in check for check in checks)
            print(f"  {configuration:<20} {'accepted' if passed else 'REJECTED':<9} " + ", ".join(checks))
        print()


def main(argv):
    command, *rest = argv
    if command == "row":
        run, dataset, configuration, seed, *metrics = rest
        row(run, dataset, configuration, seed, metrics)
    elif command == "summary":
        results, out, *metrics = rest
        summary(results, out, metrics)
    else:
        raise SystemExit(f"error: unknown command {command!r}; use row or summary")


if __name__ == "__main__":
    main(sys.argv[1:])
