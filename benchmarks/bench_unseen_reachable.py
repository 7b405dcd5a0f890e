r"""How realistic can an unseen (type, donor) combination be made without its cells? References from real cells only.

    python benchmarks/bench_unseen_reachable.py --data dataset/baron_human.h5ad --out checkpoint/unseen_reachable

For every (type, donor) combination with at least --min_cells cells whose type has cells of another donor, a donor
classifier is fitted on the real cells of the type (as `exp_script/unseen_combination.py score` fits it), and in
its feature space the kNN AUC against the combination's real cells is measured for:

* the combination's own real cells, one half against the other (the floor: what a perfect generator would score,
  up to the halves' size);
* the type's real cells of the other donors (a generator right about the type and blind to the donor);
* those cells moved by the donor's mean difference on the other types (an additive donor effect learned without
  the combination, at its best: `unseen_guidance.donor_shift_references`);
* those cells moved by the combination's own mean difference (an oracle that knows the answer's mean).

Beside each, the share the classifier calls the combination's donor. Writes OUT/reachable.tsv and OUT/reachable.md.
"""
import argparse
import os
import sys

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def halves_auc(features, seed):
    """kNN AUC of one random half of the rows against the other."""
    from exp_script.evaluation.metrics import knn_auc

    order = np.random.default_rng([seed, 23]).permutation(len(features))
    half = len(order) // 2
    return knn_auc(features[order[:half]], features[order[half:2 * half]], seed)


def reachable(data, type_key, donor_key, min_cells, seed):
    from exp_script.evaluation.guidance_inputs import read_cells
    from exp_script.evaluation.label_classifier import fit_label_classifier
    from exp_script.evaluation.unseen_guidance import other_donors_auc, donor_shift_references

    x, _, obs = read_cells(data, [type_key, donor_key])
    types, donors = obs[type_key].to_numpy(), obs[donor_key].to_numpy()
    rows = []
    for cell_type in sorted(set(types)):
        of_type = types == cell_type
        type_donors = donors[of_type]
        if len(set(type_donors)) < 2:
            continue
        classifier = fit_label_classifier(x[of_type], type_donors, seed=seed)
        features = classifier[:-1].transform(x[of_type])
        for donor in sorted(set(type_donors)):
            own = type_donors == donor
            if own.sum() < min_cells:
                continue
            count = int(own.sum())
            references = donor_shift_references(x, obs, type_key, donor_key, cell_type, donor, classifier, count, seed)
            rows.append({"cell_type": cell_type, "donor": donor, "cells": count,
                         "real_halves_knn_auc": halves_auc(features[own], seed),
                         "other_donors_real_knn_auc": other_donors_auc(features, own, count, seed),
                         **{key: value for key, value in references.items() if key != "additive_shift_types"},
                         "additive_shift_types": len(references["additive_shift_types"])})
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "dataset", "baron_human.h5ad"))
    parser.add_argument("--type_key", default="cell_type1")
    parser.add_argument("--donor_key", default="donor")
    parser.add_argument("--min_cells", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    table = reachable(args.data, args.type_key, args.donor_key, args.min_cells, args.seed)
    if table.empty:
        raise SystemExit(f"error: no ({args.type_key}, {args.donor_key}) combination with at least {args.min_cells} "
                         f"cells whose type has another {args.donor_key}")
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "reachable.tsv"), sep="\t", index=False)
    figures = [c for c in table.columns if c.endswith("_knn_auc") or c.endswith("_called_correctly")]
    mean = table[figures].mean()
    lines = ["| combination | cells | " + " | ".join(figures) + " |", "|---" * (len(figures) + 2) + "|"]
    for _, row in table.iterrows():
        cells = " | ".join("" if pd.isna(row[c]) else f"{row[c]:.3f}" for c in figures)
        lines.append(f"| {row['cell_type']} x {row['donor']} | {row['cells']} | {cells} |")
    lines.append("| **mean** | | " + " | ".join(f"{mean[c]:.3f}" for c in figures) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "reachable.md"), "w") as stream:
        stream.write(text)
    print(text)


if __name__ == "__main__":
    main()
