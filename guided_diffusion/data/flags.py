"""The loader's command-line flags (``add_data_args``) and the one call that turns them into a dataset."""
from guided_diffusion.cli import positive_int, str2bool
from guided_diffusion.data.dataset import DEFAULT_BLOCK_ROWS, load_dataset
from guided_diffusion.data.files import BACKED_AUTO_BYTES
from guided_diffusion.data.labels import DEFAULT_LABEL_KEY


def backed_mode(value):
    """``auto`` or a boolean, for ``--backed``."""
    if str(value).strip().lower() == "auto":
        return "auto"
    return str2bool(value)


def add_input_kind_args(parser_or_group):
    """``--input_is_log`` and its override ``--allow_count_like_log`` (for scripts with their own parser)."""
    parser_or_group.add_argument("--input_is_log", type=str2bool, default=False,
                                 help="True if the values are already log-normalized (default: raw counts)")
    parser_or_group.add_argument("--allow_count_like_log", type=str2bool, default=False,
                                 help="with --input_is_log True: accept values that look like raw counts (all whole "
                                      "numbers, median cell total >= 100), which are otherwise refused")


def add_data_args(parser, labels=True):
    """The loader's flags, shared by every script that reads an h5ad."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", required=True, help="path to the .h5ad file")
    if labels:
        group.add_argument("--label_key", action="append", default=None,
                           help=f"obs column with the labels; repeat for several conditions "
                                f"(default: {DEFAULT_LABEL_KEY})")
    group.add_argument("--layer", default="",
                       help="read this layer instead of X ('raw' reads adata.raw)")
    add_input_kind_args(group)
    group.add_argument("--filter", action="append", default=[], metavar="KEY=V1[,V2]",
                       help="keep only cells whose obs[KEY] is one of the values; repeatable")
    group.add_argument("--backed", type=backed_mode, default="auto", metavar="{auto,True,False}",
                       help=f"stream the matrix from disk in row blocks instead of loading it (auto: when the "
                            f"stored matrix exceeds {BACKED_AUTO_BYTES / 1024 ** 3:g} GiB)")
    group.add_argument("--block_rows", type=positive_int, default=DEFAULT_BLOCK_ROWS,
                       help="backed mode: consecutive cells per disk read; training shuffles the order of the "
                            "blocks and the cells inside each block")
    return group


def dataset_from_args(args, labels=True, require_labels=True):
    """The dataset the flags of :func:`add_data_args` describe."""
    return load_dataset(args.data_dir, label_keys=args.label_key if labels else [],
                        layer=args.layer, input_is_log=args.input_is_log, filters=args.filter,
                        require_labels=require_labels, backed=args.backed, block_rows=args.block_rows,
                        allow_count_like_log=getattr(args, "allow_count_like_log", False))
