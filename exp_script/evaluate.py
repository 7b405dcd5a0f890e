r"""Evaluate generated cells against real ones and write metrics.json, report.md and plots.

    python exp_script/evaluate.py --real dataset/baron_human.h5ad \
        --generated output/generated.h5ad --label_key cell_type1 --out output/evaluation

The real file may hold raw counts (default) or log-normalized values (--input_is_log True);
the generated file is the sampler's h5ad (log-normalized X, one obs column per label key).
metrics.json has a "generated" and a "real_vs_real" (positive control) section, each with
"overall" and "per_label" figures; it is written last, so it exists only for finished runs.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script, from the project root or from inside exp_script/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exp_script.evaluation import METRICS, EvaluationSettings, evaluate, metrics_table  # noqa: E402
from guided_diffusion.cli import (ArgumentParser, add_debug_arg, check_writable_dir, command,  # noqa: E402
                                  non_negative_int, positive_int, str2bool)
from guided_diffusion.data import DEFAULT_LABEL_KEY  # noqa: E402


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True, help="real cells (.h5ad)")
    parser.add_argument("--generated", required=True, help="generated cells (.h5ad written by the sampler)")
    parser.add_argument("--label_key", default=DEFAULT_LABEL_KEY,
                        help=f"obs column with the labels, in both files (default: {DEFAULT_LABEL_KEY})")
    parser.add_argument("--out", required=True, help="output folder for metrics.json, report.md and plots")
    parser.add_argument("--layer", default="", help="read this layer of the real file instead of X "
                                                    "('raw' reads adata.raw)")
    parser.add_argument("--input_is_log", type=str2bool, default=False,
                        help="True if the real values are already log-normalized (default: raw counts)")
    parser.add_argument("--allow_count_like_log", type=str2bool, default=False,
                        help="with --input_is_log True: accept real values that look like raw counts")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=V1[,V2]",
                        help="keep only real cells whose obs[KEY] is one of the values; repeatable")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (split, subsamples, models)")
    parser.add_argument("--min_cells", type=positive_int, default=10,
                        help="per-label figures need this many cells in each real half and in the generated set")
    parser.add_argument("--n_hvg", type=positive_int, default=2000,
                        help="variable genes for the PCA, the classifiers and CellTypist")
    parser.add_argument("--n_pcs", type=positive_int, default=50, help="principal components")
    parser.add_argument("--marker_genes", type=non_negative_int, default=5000,
                        help="search markers among this many most variable genes (0: all genes)")
    parser.add_argument("--max_cells", type=positive_int, default=20000,
                        help="subsample each file to at most this many cells")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS, metavar="NAME",
                        help=f"metrics to compute (default: all of {' '.join(METRICS)})")
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
                                  metrics=tuple(args.metrics), plots=args.plots)
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if args.progress else None
    results = evaluate(args.real, args.generated, args.label_key, args.out, layer=args.layer,
                       input_is_log=args.input_is_log, filters=args.filter, settings=settings, log=log,
                       allow_count_like_log=args.allow_count_like_log)
    print(metrics_table(results).to_string(float_format=lambda value: f"{value:.4f}"))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return results


if __name__ == "__main__":
    main()
