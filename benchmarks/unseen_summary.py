"""Summarize benchmarks/bench_unseen.sh: one row per (held-out combination, setting), mean ± sd over training
seeds of the held-out combination's donor calls and kNN AUC beside the seen combinations' figures.

    python benchmarks/unseen_summary.py checkpoint/bench_unseen [--markdown OUT.md]
"""
import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np

FIGURES = (("held_out_generated_called_correctly", "unseen called right"),
           ("held_out_real_called_correctly", "real cells of it called right"),
           ("seen_generated_called_wrong_mean", "seen called wrong"),
           ("held_out_knn_auc", "unseen kNN AUC"),
           ("held_out_other_donors_real_knn_auc", "other donors' real cells kNN AUC"),
           ("held_out_additive_shift_knn_auc", "same, moved by the donor's shift on other types"),
           ("held_out_own_mean_shift_knn_auc", "same, moved to the combination's own mean (oracle)"),
           ("seen_knn_auc_mean", "seen kNN AUC"))


def collect(root):
    """{(combination, setting): {figure: [value per seed]}} from ROOT/<combination>/seed<S>/<setting>/score
    (bench_unseen.sh) or ROOT/seed<S>/<setting>/score (bench_unseen_choice.sh); the combination is the scored one,
    <type>_<donor>."""
    table = defaultdict(lambda: defaultdict(list))
    paths = glob.glob(os.path.join(root, "*", "seed*", "*", "score", "unseen_combination.json")) + \
        glob.glob(os.path.join(root, "seed*", "*", "score", "unseen_combination.json"))
    for path in sorted(paths):
        setting = path.split(os.sep)[-3]
        with open(path) as stream:
            result = json.load(stream)
        summary = result["summary"]
        combination = f"{result['setting']['cell_type']}_{result['setting']['donor']}"
        for key, _ in FIGURES:
            if summary.get(key) is not None:
                table[(combination, setting)][key].append(float(summary[key]))
    return table


def cell(values):
    if not values:
        return ""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f} (n={len(values)})" if len(values) > 1 else f"{values[0]:.3f}"


def markdown(table):
    lines = ["| held out | setting | " + " | ".join(name for _, name in FIGURES) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in FIGURES) + " |"]
    for (combination, setting), figures in sorted(table.items()):
        lines.append(f"| {combination} | {setting} | " + " | ".join(cell(figures.get(key, [])) for key, _ in FIGURES)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--markdown", default="")
    args = parser.parse_args(argv)
    text = markdown(collect(args.root))
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w") as stream:
            stream.write(text)


if __name__ == "__main__":
    main()
