"""Summary of ``benchmarks/bench_peer.sh``: per dataset, the scVI peer's held-out figures as mean ± sd over seeds,
beside the positive control (training cells vs held-out), in the columns of our recipe rows (recipe_summary.py).

    python -m benchmarks.peer_summary checkpoint/peer baron
"""
import glob
import json
import os

from benchmarks.recipe_summary import figures_cells, mean_sd, novelty_passes, run_figures, stage_seconds, write_table
from guided_diffusion.cli import ArgumentParser, HelpFormatter, command

COLUMNS = ["knn_auc", "rf_auc", "ilisi", "celltypist_accuracy", "de_lfc_pearson", "marker_jaccard", "tstr_macro_f1"]


def dataset_rows(folder):
    """(the peer's figures per seed, the positive control's per seed, scVI training seconds per seed)."""
    peer, controls, seconds = [], [], []
    for metrics_path in sorted(glob.glob(os.path.join(folder, "seed*", "evaluation", "metrics.json"))):
        run = os.path.dirname(os.path.dirname(metrics_path))
        with open(metrics_path) as stream:
            generated, control = run_figures(json.load(stream))
        peer.append(generated)
        controls.append(control)
        record_path = os.path.join(run, "peer.json")
        if os.path.exists(record_path):
            with open(record_path) as stream:
                seconds.append(json.load(stream).get("train_seconds"))
        else:
            seconds.append(stage_seconds(os.path.join(run, "times.tsv")).get("scvi (train, generate, posterior predictive)"))
    return peer, controls, seconds


def summarize(out, names):
    lines = ["| dataset | row | seeds | " + " | ".join(COLUMNS) + " | novelty passes | scVI training s |",
             "|" + "---|" * (len(COLUMNS) + 5)]
    for name in names:
        peer, controls, seconds = dataset_rows(os.path.join(out, name))
        if not peer:
            lines.append(f"| {name} | (no evaluated run) |" + " |" * (len(COLUMNS) + 3))
            continue
        lines.append(f"| {name} | train vs held-out (positive control) | {len(controls)} | "
                     f"{figures_cells(controls, COLUMNS)} | — | — |")
        lines.append(f"| {name} | scVI (peer) | {len(peer)} | {figures_cells(peer, COLUMNS)} | {novelty_passes(peer)} | "
                     f"{mean_sd(seconds, digits=0)} |")
    return write_table(out, lines)


@command
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("out", help="the folder bench_peer.sh wrote")
    parser.add_argument("names", nargs="+", help="dataset names (subfolders of OUT)")
    args = parser.parse_args(argv)
    summarize(args.out, args.names)


if __name__ == "__main__":
    main()
