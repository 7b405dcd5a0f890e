r"""Choose the autoencoder's recipe for a dataset on validation cells inside its training data, then train it.

    python exp_script/choose_autoencoder.py --data_dir split/train.h5ad --label_key cell_type \
        --save_dir checkpoint/choice --decoder_label_key cell_type

The better recipe of the autoencoder depends on the dataset (docs/fidelity.md: a batch of 32 helps PBMC 3k's
generated cells, not Baron's; a variational latent helps those of a larger cord-blood dataset, neither bundled one's),
and the autoencoder's own validation loss cannot tell which: this
chooses by the realism of the cells its decoder makes instead. The cells of --data_dir (the training split: never
give it the held-out cells) are split once, stratified by --label_key (--val_fraction, --split_seed), into fitting and
validation cells. Each candidate is trained on the fitting cells with every --seeds seed; the fitting cells' decoded
latents and the validation cells' reconstructions (counts drawn) are scored against the validation cells with the
evaluation's kNN and RF AUCs; the candidate with the lowest mean of the four over the seeds wins, and is trained on
every cell of --data_dir with the first seed into SAVE_DIR/final (use its model_seed=S_best.pt as --vae_path).

A candidate is NAME=FLAGS (VAE/VAE_train.py flags, quoted), or a name from the defaults alone:
default (no flags), batch32 (--batch_size 32 for as many epochs: the step cap, checkpoint interval and patience
times the shared batch size over 32, four times the defaults') and vae (a variational latent, scVI-like: --latent_dim
30 --kl_weight 1 --dropout 0.1 --early_stopping_patience 1000, with twice the step cap and checkpoint interval for the
longer patience). Any other VAE/VAE_train.py flag given here (after the
flags below: --decoder_label_key, --hidden_dims, ...) goes to every run. Early stopping is required (here by default
--early_stopping_patience 300, --max_steps 3000, checked every --log_interval 20 steps); a run that reaches its
--max_steps before early stopping ends it is reported (raise --max_steps on a larger dataset).

Writes SAVE_DIR/split, SAVE_DIR/candidates/NAME_seedS (each run), choice.tsv (one row per run), choice.md (the
table, mean ± sd over seeds, and the rule), choice.json (the winner and its flags) and SAVE_DIR/final. Runs already
in choice.tsv are reused, so an interrupted choice continues where it stopped; more seeds or candidates can be added
the same way (a default candidate whose defaults changed since its runs trains again, the earlier runs kept as
NAME_previous).
"""
import argparse

from exp_script.evaluation.autoencoder_choice import DEFAULT_CANDIDATES, choose_autoencoder, parse_candidates
from guided_diffusion.cli import (ArgumentParser, add_debug_arg, add_threads_arg, apply_thread_flags, command,
                                  fraction, str2bool)
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.data import DEFAULT_LABEL_KEY

# the lever screen's settings (benchmarks/bench_decoder_levers.py): early stopping checked every 20 steps
SHARED_DEFAULTS = ["--max_steps", "3000", "--checkpoint_freq", "3000", "--early_stopping_patience", "300",
                   "--log_interval", "20"]


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    parser.add_argument("--data_dir", required=True, help="the training cells (.h5ad, raw counts)")
    parser.add_argument("--label_key", default=DEFAULT_LABEL_KEY,
                        help="obs column the split is stratified by and the AUCs are computed per (default: "
                             "%(default)s)")
    parser.add_argument("--save_dir", required=True, help="folder for the runs, the tables and the final autoencoder")
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                        help="NAME=FLAGS or a default name (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="training seeds of every candidate (default: %(default)s)")
    parser.add_argument("--val_fraction", type=fraction, default=0.15,
                        help="share of each label set aside as validation cells (default: %(default)s)")
    parser.add_argument("--split_seed", type=int, default=1, help="seed of that split (default: %(default)s)")
    parser.add_argument("--final", type=str2bool, default=True,
                        help="train the winner on every cell of --data_dir (default: %(default)s)")
    parser.add_argument("--progress", type=str2bool, default=True, help="progress bar of the final training")
    add_threads_arg(parser, deterministic=True)
    add_debug_arg(parser)
    return parser


@command
def main(argv=None):
    args, shared = build_parser().parse_known_args(argv)
    apply_thread_flags(args)
    check_writable_dir(args.save_dir, "--save_dir")
    candidates = parse_candidates(args.candidates, SHARED_DEFAULTS + shared)
    choice = choose_autoencoder(args.data_dir, args.label_key, args.save_dir, candidates, SHARED_DEFAULTS + shared,
                                seeds=args.seeds, val_fraction=args.val_fraction, split_seed=args.split_seed,
                                final=args.final, progress=args.progress)
    ranking = ", ".join(f"{name} {value:.3f}" for name, value in sorted(choice.scores.items(), key=lambda i: i[1]))
    print(f"chosen: {choice.chosen} ({choice.flags or 'the defaults'}); mean AUC over seeds: {ranking}")
    if choice.final_path:
        print(f"trained on every cell of {args.data_dir}: {choice.final_path} (use it as --vae_path)")
    return choice


if __name__ == "__main__":
    main()
