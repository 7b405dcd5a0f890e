r"""Evaluate generated cells against real ones and write metrics.json, report.md and plots.

    python exp_script/evaluate.py --real heldout.h5ad --train train.h5ad \
        --generated output/generated.h5ad --label_key cell_type1 --out output/evaluation

--real holds the real cells to compare with: on a held-out protocol the cells the model did not see
(exp_script/split.py writes such a split); --train the cells the model was trained on (novelty and
usefulness checks, and the train-vs-held-out positive control). Each file may hold raw counts or
log-normalized values: --layer/--input_is_log describe --real and --train, --generated_layer/
--generated_input_is_log the generated file (default: the sampler's log-normalized X).
metrics.json has one section per compared set ("generated", the positive controls "real_vs_real" and
"train_vs_heldout", the negative controls "memorizer" and "collapsed"), each with "overall" and
"per_label" figures; it is written last, so it exists only for finished runs. Every input is checked
before anything in --out is touched.
"""
import argparse
import os
import sys

from exp_script.evaluation.pipeline import METRICS, EvaluationSettings, evaluate, metrics_table
from guided_diffusion.cli import ArgumentParser, add_debug_arg, command, non_negative_int, positive_int, str2bool
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.data import DEFAULT_LABEL_KEY


def add_input_args(parser):
    parser.add_argument("--real", required=True, help="real cells (.h5ad): the held-out cells on a held-out protocol")
    parser.add_argument("--generated", required=True, help="generated cells (.h5ad written by the sampler)")
    parser.add_argument("--train", default=None, help="the cells the model was trained on (.h5ad); enables the "
                                                      "novelty and usefulness checks")
    parser.add_argument("--label_key", default=DEFAULT_LABEL_KEY,
                        help=f"obs column with the labels, in every file (default: {DEFAULT_LABEL_KEY})")
    parser.add_argument("--condition_key", action="append", default=[], metavar="KEY",
                        help="a second label key (e.g. donor): DE fidelity of its effect within each label; "
                             "repeatable")
    parser.add_argument("--layer", default="", help="read this layer of --real and --train instead of X "
                                                    "('raw' reads adata.raw)")
    parser.add_argument("--input_is_log", type=str2bool, default=False,
                        help="True if --real and --train hold log-normalized values (default: raw counts)")
    parser.add_argument("--generated_layer", default="", help="read this layer of --generated instead of X "
                                                              "(e.g. counts)")
    parser.add_argument("--generated_input_is_log", type=str2bool, default=True,
                        help="False if the generated values are raw counts (default: log-normalized, "
                             "the sampler's X)")
    parser.add_argument("--allow_count_like_log", "--allow_integer_log", type=str2bool, default=False,
                        help="accept values declared log-normalized that look like raw counts (all whole numbers, "
                             "median cell total >= 100; refused by default)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=V1[,V2]",
                        help="keep only real (and training) cells whose obs[KEY] is one of the values; repeatable")


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument("--out", required=True, help="output folder for metrics.json, report.md and plots")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (split, subsamples, models)")
    parser.add_argument("--min_cells", type=positive_int, default=10,
                        help="per-label figures need this many cells in each real half and in the generated set; "
                             "fewer generated cells in all is refused")
    parser.add_argument("--n_hvg", type=positive_int, default=2000,
                        help="variable genes for the PCA, the classifiers and CellTypist")
    parser.add_argument("--n_pcs", type=positive_int, default=50, help="principal components")
    parser.add_argument("--marker_genes", type=non_negative_int, default=5000,
                        help="search markers among this many most variable genes (0: all genes)")
    parser.add_argument("--max_cells", type=positive_int, default=20000,
                        help="subsample each file to at most this many cells")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS, metavar="NAME",
                        help=f"metrics to compute (default: all of {' '.join(METRICS)})")
    parser.add_argument("--condition_min_cells", type=positive_int, default=10,
                        help="a condition pair within a label needs this many cells per side (default: 10)")
    parser.add_argument("--controls", type=str2bool, default=True,
                        help="score the memorizer and collapsed negative controls beside the generated cells")
    parser.add_argument("--rare_max_cells", type=positive_int, default=30,
                        help="augmentation: a label with fewer training cells than this is rare (default: 30)")
    parser.add_argument("--augmentation_seeds", type=positive_int, default=5,
                        help="augmentation: bootstrap seeds for mean ± sd (default: 5)")
    parser.add_argument("--plots", type=str2bool, default=True, help="write the UMAP and metric plots")
    parser.add_argument("--progress", type=str2bool, default=True, help="one line per stage on stderr")
    add_debug_arg(parser)
    return parser


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_writable_dir(args.out, "--out")
    settings = EvaluationSettings(seed=args.seed, min_cells=args.min_cells, n_hvg=args.n_hvg, n_pcs=args.n_pcs,
                                  marker_genes=args.marker_genes, max_cells=args.max_cells,
                                  metrics=tuple(args.metrics), plots=args.plots, controls=args.controls,
                                  condition_min_cells=args.condition_min_cells, rare_max_cells=args.rare_max_cells,
                                  augmentation_seeds=args.augmentation_seeds)
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if args.progress else None
    results = evaluate(args.real, args.generated, args.label_key, args.out, layer=args.layer,
                       input_is_log=args.input_is_log, filters=args.filter, settings=settings, log=log,
                       train_path=args.train, generated_layer=args.generated_layer,
                       generated_input_is_log=args.generated_input_is_log, condition_keys=args.condition_key,
                       allow_count_like_log=args.allow_count_like_log)
    print(metrics_table(results).to_string(float_format=lambda value: f"{value:.4f}"))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return results


if __name__ == "__main__":
    main()
