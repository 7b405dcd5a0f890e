r"""Are generated cells useful? Cell-type classifiers scored on held-out real cells.

    python exp_script/augment.py --train split/train.h5ad --heldout split/heldout.h5ad \
        --generated output/generated.h5ad --label_key cell_type1 --out output/usefulness

Train on synthetic, test on real (a logistic regression trained on the generated cells only, beside the
same classifier trained on the real training cells and on two negative controls), and rare-type
augmentation (generated cells of each label with fewer than --rare_max_cells training cells added to the
real training set; per-label recall/F1 and macro-F1 with and without, mean ± sd over --seeds bootstrap
seeds). Writes OUT/usefulness.json and OUT/usefulness.md (each atomically). exp_script/evaluate.py runs
the same checks when it is given --train.
"""
import argparse
import json
import os

from exp_script.evaluation.comparison import usefulness_check
from exp_script.evaluation.inputs import json_ready, load_evaluation_data
from exp_script.evaluation.pipeline import write_atomic
from exp_script.evaluation.report import usefulness_lines
from exp_script.evaluation.settings import EvaluationSettings
from guided_diffusion.cli import ArgumentParser, add_debug_arg, command, positive_int, str2bool
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.data import DEFAULT_LABEL_KEY


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="the real cells the model was trained on (.h5ad)")
    parser.add_argument("--heldout", required=True, help="real cells the model did not see (.h5ad)")
    parser.add_argument("--generated", required=True, help="generated cells (.h5ad written by the sampler)")
    parser.add_argument("--label_key", default=DEFAULT_LABEL_KEY,
                        help="obs column with the labels (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder for usefulness.json and usefulness.md")
    parser.add_argument("--layer", default="", help="layer of --train and --heldout ('raw' reads adata.raw)")
    parser.add_argument("--input_is_log", type=str2bool, default=False,
                        help="True if --train and --heldout hold log-normalized values (default: raw counts)")
    parser.add_argument("--generated_layer", default="", help="layer of --generated (default: X)")
    parser.add_argument("--generated_input_is_log", type=str2bool, default=True,
                        help="False if the generated values are raw counts (default: log-normalized)")
    parser.add_argument("--rare_max_cells", type=positive_int, default=30,
                        help="a label with fewer training cells than this is rare (default: %(default)s)")
    parser.add_argument("--seeds", type=positive_int, default=5, help="bootstrap seeds (default: %(default)s)")
    parser.add_argument("--controls", type=str2bool, default=True,
                        help="also score the memorizer and collapsed controls")
    parser.add_argument("--n_hvg", type=positive_int, default=2000, help="variable genes of the features")
    parser.add_argument("--n_pcs", type=positive_int, default=50, help="principal components of the features")
    parser.add_argument("--max_cells", type=positive_int, default=20000, help="subsample each file to this many cells")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    add_debug_arg(parser)
    return parser


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_writable_dir(args.out, "--out")
    settings = EvaluationSettings(seed=args.seed, n_hvg=args.n_hvg, n_pcs=args.n_pcs, max_cells=args.max_cells,
                                  controls=args.controls, rare_max_cells=args.rare_max_cells,
                                  augmentation_seeds=args.seeds)
    data = load_evaluation_data(args.heldout, args.generated, args.label_key, layer=args.layer,
                                input_is_log=args.input_is_log, max_cells=args.max_cells, seed=args.seed,
                                generated_layer=args.generated_layer,
                                generated_input_is_log=args.generated_input_is_log, train_path=args.train)
    results = {"inputs": data.inputs, "warnings": data.warnings, **usefulness_check(data, settings)}
    text = "\n".join(["# cfDiffusion usefulness"] + usefulness_lines(results)) + "\n"
    write_atomic(os.path.join(args.out, "usefulness.md"), text)
    write_atomic(os.path.join(args.out, "usefulness.json"), json.dumps(json_ready(results), indent=2) + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
