r"""Unseen condition combinations, measured: does a two-key model generate a (type, donor) it never saw?

1. ``exclude`` writes the training file without one combination (the loader's --filter keeps values, it
   cannot drop a combination):

    python exp_script/unseen_combination.py exclude --data dataset/baron_human.h5ad \
        --cell_type beta --donor human4 --out checkpoint/unseen/train.h5ad

2. Train the autoencoder and a two-key model (--label_key cell_type1 --label_key donor) on that file and
   generate the held-out combination and the seen ones of the same type (cell_sample.py --condition).
3. ``score`` fits a donor classifier on the real cells of that type (all donors, the held-out ones
   included) and reports the fraction of generated cells called each intended donor, beside the real-data
   references: real cells of the combination called correctly out of fold, and a donor-blind generator
   (the type's cells of the other donors, out of fold: how often they pass for the held-out donor):

    python exp_script/unseen_combination.py score --real dataset/baron_human.h5ad \
        --generated G.h5ad --cell_type beta --donor human4 --out R

Beside them, two references built from real cells: the type's cells of the other donors moved by the held-out
donor's mean difference on the other types (the best an additive donor effect learned without the combination can
do) and by the combination's own mean difference (an oracle that knows the answer's mean); their kNN AUC bounds
the realism a generator of an unseen combination can be expected to reach.

Writes R/unseen_combination.json and R/unseen_combination.md; the acceptance line is "generated cells of
the held-out combination are called the held-out donor at least half as often as real cells of it are".
"""
import argparse
import json
import os

import anndata
import numpy as np

from exp_script.evaluation.guidance_inputs import align_to, generated_cells, read_cells
from exp_script.evaluation.unseen_guidance import donor_calls, donor_shift_references
from guided_diffusion.core.atomic import atomic_output
from guided_diffusion.cli import ArgumentParser, UsageError, add_debug_arg, command
from guided_diffusion.data import read_h5ad

RESULT_JSON = "unseen_combination.json"
RESULT_MD = "unseen_combination.md"


# ---- exclude ---------------------------------------------------------------------------------------
def combination_mask(obs, type_key, donor_key, cell_type, donor):
    """Rows of ``obs`` in the (cell_type, donor) combination; refuses values the file does not have."""
    for key, value in ((type_key, cell_type), (donor_key, donor)):
        if key not in obs.columns:
            raise UsageError(f"no obs column {key!r}; columns: {', '.join(map(str, obs.columns))}")
        values = sorted(set(obs[key].astype(str)))
        if value not in values:
            raise UsageError(f"{key}={value}: not in the data; values of {key}: {', '.join(values)}")
    return (obs[type_key].astype(str) == cell_type).to_numpy() & (obs[donor_key].astype(str) == donor).to_numpy()


def exclude_combination(data, out, type_key, donor_key, cell_type, donor):
    """Write ``data`` without the (cell_type, donor) cells to ``out``; returns (cells removed, cells kept)."""
    adata = read_h5ad(str(data))
    held_out = combination_mask(adata.obs, type_key, donor_key, cell_type, donor)
    if not held_out.any():
        raise UsageError(f"{type_key}={cell_type},{donor_key}={donor} has no cells in {data}; choose a combination "
                         f"that exists")
    kept = adata[~held_out].copy()
    if not (kept.obs[type_key].astype(str) == cell_type).any():
        raise UsageError(f"{cell_type} has no cells of another {donor_key}: the model could not learn the type")
    with atomic_output(out) as temp_path:
        kept.write_h5ad(temp_path)
    return int(held_out.sum()), int(kept.n_obs)


# ---- score -----------------------------------------------------------------------------------------
def blind_sample_calls(classifier, blind_x, blind_obs, type_key, cell_type, donor):
    """The fraction of a donor-unconditioned generated sample of the type that is called the held-out donor."""
    rows = (blind_obs[type_key] == cell_type).to_numpy()
    if not rows.any():
        raise UsageError(f"the donor-blind sample has no cells of {type_key}={cell_type}")
    return float(np.mean(classifier.predict(blind_x[rows]) == donor))


def summarize(rows, donor, blind_sample=None, references=None):
    held_out = next(row for row in rows if row["donor"] == donor)
    references = references or {}
    seen = [row for row in rows if not row["held_out"] and row["generated_cells"]]
    generated, real = held_out["generated_called_correctly"], held_out["real_called_correctly"]
    return {
        "held_out_generated_called_correctly": generated,
        "held_out_real_called_correctly": real,
        "donor_blind_real_called_held_out": held_out["donor_blind_called_this_donor"],
        "donor_blind_sample_called_held_out": blind_sample,
        "seen_generated_called_correctly_mean": float(np.mean([r["generated_called_correctly"] for r in seen]))
        if seen else None,
        "seen_real_called_correctly_mean": float(np.mean([r["real_called_correctly"] for r in seen])) if seen else None,
        "held_out_knn_auc": held_out["knn_auc"],
        # the same figure for the type's real cells of the other donors (a generator right about the type, blind to
        # the donor, drawing real cells): the realism reachable without the combination's own cells is near it
        "held_out_other_donors_real_knn_auc": held_out["other_donors_real_knn_auc"],
        # those cells moved by the donor's mean difference on the other types (an additive donor effect learned
        # without the combination, at its best) and by the combination's own mean difference (an oracle): what
        # realism a generator that gets the donor effect's mean right reaches (unseen_guidance.donor_shift_references)
        **{f"held_out_{key}": value for key, value in references.items()},
        # the same two figures for the seen combinations of the same model: the reference the held-out
        # combination's cells are judged against (caricatures score high donor calls but a high kNN AUC)
        "seen_generated_called_wrong_mean": None if not seen else
        float(np.mean([1.0 - r["generated_called_correctly"] for r in seen])),
        "seen_knn_auc_mean": None if not [r for r in seen if r["knn_auc"] is not None] else
        float(np.mean([r["knn_auc"] for r in seen if r["knn_auc"] is not None])),
        "passes_half_of_real": None if generated is None else bool(generated >= 0.5 * real),
    }


def render(result):
    summary, setting = result["summary"], result["setting"]
    lines = [f"# Unseen combination {setting['type_key']}={setting['cell_type']} x "
             f"{setting['donor_key']}={setting['donor']}", "",
             "Donor classifier: logistic regression on PCA of the real cells of the type (all donors); real "
             "figures out of fold.", "",
             "| donor | held out | real cells | real called correctly | generated cells | generated called "
             "correctly | donor-blind (other donors' real cells) called this donor | kNN AUC generated vs real | "
             "kNN AUC other donors' real cells vs real |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    def figure(value):
        return "" if value is None else f"{value:.3f}"

    for row in result["donors"]:
        generated = figure(row["generated_called_correctly"])
        lines.append(f"| {row['donor']} | {'yes' if row['held_out'] else ''} | {row['real_cells']} | "
                     f"{row['real_called_correctly']:.3f} | {row['generated_cells']} | {generated} | "
                     f"{row['donor_blind_called_this_donor']:.3f} | "
                     f"{figure(row['knn_auc'])} | {figure(row.get('other_donors_real_knn_auc'))} |")
    lines += ["", "held_out_additive_shift_*: the other donors' real cells of the type moved by the held-out donor's "
              "mean difference on the other types (an additive donor effect learned without the combination, at its "
              "best); held_out_own_mean_shift_*: moved by the combination's own mean difference (an oracle).", "",
              *(f"- {key}: {value if not isinstance(value, float) else f'{value:.3f}'}"
                    for key, value in summary.items())]
    return "\n".join(lines) + "\n"


def score(real, generated, out, type_key, donor_key, cell_type, donor, blind=None, seed=0):
    real_x, real_genes, real_obs = read_cells(real, [type_key, donor_key])
    generated_x, generated_genes, generated_obs = generated_cells(generated, [type_key, donor_key])
    generated_x = align_to(generated_genes, generated_x, real_genes)
    rows, classifier = donor_calls(real_x, real_obs, generated_x, generated_obs, type_key, donor_key, cell_type,
                                   donor, seed)
    held_out = next(row for row in rows if row["donor"] == donor)
    references = donor_shift_references(real_x, real_obs, type_key, donor_key, cell_type, donor, classifier,
                                        held_out["generated_cells"], seed)
    blind_fraction = None
    if blind:
        blind_x, blind_genes, blind_obs = generated_cells(blind, [type_key])
        blind_fraction = blind_sample_calls(classifier, align_to(blind_genes, blind_x, real_genes), blind_obs,
                                            type_key, cell_type, donor)
    result = {"setting": {"real": str(real), "generated": str(generated), "donor_blind_sample": blind,
                          "type_key": type_key, "donor_key": donor_key, "cell_type": cell_type, "donor": donor,
                          "seed": seed, "provenance": _provenance(generated)},
              "donors": rows, "summary": summarize(rows, donor, blind_fraction, references)}
    os.makedirs(out, exist_ok=True)
    with atomic_output(os.path.join(out, RESULT_MD)) as temp_path, open(temp_path, "w") as stream:
        stream.write(render(result))
    with atomic_output(os.path.join(out, RESULT_JSON)) as temp_path, open(temp_path, "w") as stream:
        json.dump(result, stream, indent=1, default=str)
    return result


def _provenance(path):
    uns = anndata.read_h5ad(str(path), backed="r").uns
    record = uns.get("cfdiffusion", {})
    return {key: record[key] for key in ("checkpoint", "step", "guide_w", "guidance", "guidance_form", "guidance_forms",
                                         "sampler") if key in record}


# ---- command line ----------------------------------------------------------------------------------
def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="step", required=True)
    exclude = commands.add_parser("exclude", help="write the training file without one combination")
    exclude.add_argument("--data", required=True, help="the full .h5ad")
    exclude.add_argument("--out", required=True, help="the training .h5ad to write")
    scoring = commands.add_parser("score", help="score generated cells of the held-out and the seen combinations")
    scoring.add_argument("--real", required=True, help="the full real .h5ad (raw counts), held-out cells included")
    scoring.add_argument("--generated", required=True, help="cell_sample.py output with cells of the type")
    scoring.add_argument("--donor_blind", default=None,
                         help="optional: a sample of the type with the donor key unconditioned")
    scoring.add_argument("--out", required=True, help="folder for unseen_combination.json / .md")
    scoring.add_argument("--seed", type=int, default=0)
    for sub in (exclude, scoring):
        sub.add_argument("--type_key", default="cell_type1")
        sub.add_argument("--donor_key", default="donor")
        sub.add_argument("--cell_type", required=True)
        sub.add_argument("--donor", required=True)
        add_debug_arg(sub)
    return parser


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.step == "exclude":
        removed, kept = exclude_combination(args.data, args.out, args.type_key, args.donor_key, args.cell_type,
                                            args.donor)
        print(f"wrote {args.out}: {kept} cells, without the {removed} cells of {args.type_key}={args.cell_type},"
              f"{args.donor_key}={args.donor}")
        return removed, kept
    result = score(args.real, args.generated, args.out, args.type_key, args.donor_key, args.cell_type, args.donor,
                   blind=args.donor_blind, seed=args.seed)
    print(render(result))
    return result


if __name__ == "__main__":
    main()
