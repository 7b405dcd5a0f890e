r"""Split an .h5ad into training and held-out cells, stratified by label, seeded, reusable.

    python exp_script/split.py --data_dir dataset/baron_human.h5ad --label_key cell_type1 \
        --out checkpoint/split --heldout_fraction 0.2 --seed 0

Writes OUT/train.h5ad, OUT/heldout.h5ad and OUT/split.csv (one row per cell: its name, label and
"train" or "heldout"); each file is written under a temporary name and renamed when complete. Every
label keeps its share on both sides (a label with one cell stays in training). ``--from_split
split.csv`` applies a saved split again instead of drawing one.
"""
import argparse

from exp_script.evaluation.heldout_split import split_file
from guided_diffusion.cli import ArgumentParser, add_debug_arg, command, fraction
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.data import DEFAULT_LABEL_KEY


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="the .h5ad file to split")
    parser.add_argument("--label_key", default=DEFAULT_LABEL_KEY,
                        help="obs column to stratify by (default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder for train.h5ad, heldout.h5ad and split.csv")
    parser.add_argument("--heldout_fraction", type=fraction, default=0.2,
                        help="share of each label held out (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    parser.add_argument("--from_split", default=None, help="apply this saved split.csv instead of drawing one")
    add_debug_arg(parser)
    return parser


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_writable_dir(args.out, "--out")
    paths, table = split_file(args.data_dir, args.out, args.label_key, args.heldout_fraction, args.seed,
                              args.from_split)
    counts = table["side"].value_counts()
    print(f"train: {counts.get('train', 0)} cells -> {paths['train']}")
    print(f"heldout: {counts.get('heldout', 0)} cells -> {paths['heldout']}")
    print(f"split: {paths['split']}")
    return paths


if __name__ == "__main__":
    main()
