"""Train the gene-expression autoencoder on an h5ad file.

    python VAE/VAE_train.py --data_dir dataset/baron_human.h5ad --num_genes 20125 \
        --save_dir checkpoint/AE --max_steps 200000

Several processes (--batch_size stays the global batch): torchrun --nproc_per_node N VAE/VAE_train.py ...
or mpiexec -n N python VAE/VAE_train.py ...; files larger than memory: --backed True (see docs/scaling.md).
"""
import argparse

from guided_diffusion.cli import (ArgumentParser, HelpFormatter, add_debug_arg, add_device_arg, command,
                                  fraction, non_negative_float, non_negative_int, positive_float, positive_int,
                                  str2bool)
from guided_diffusion.data.flags import add_data_args
from guided_diffusion.core.distributed import setup_distributed
from guided_diffusion.cli import add_threads_arg, apply_thread_flags
from guided_diffusion.training.config import defaults_of, AutoencoderModelConfig, AutoencoderTrainingConfig, DataConfig, from_flags
from guided_diffusion.core.errors import settings_worded_as_flags
from VAE.autoencoder_training import train_autoencoder

# the flags' defaults are the settings' (guided_diffusion/training/config.py), stated once
DEFAULTS = defaults_of(AutoencoderModelConfig, AutoencoderTrainingConfig)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(parser, labels=False)
    parser.add_argument("--num_genes", type=positive_int, default=DEFAULTS["num_genes"],
                        help="number of genes; inferred from the data, checked if given")
    parser.add_argument("--save_dir", required=True, help="folder for checkpoints and train_log.csv")
    parser.add_argument("--max_steps", type=positive_int, default=DEFAULTS["max_steps"],
                        help="optimizer steps to train for (the step count of a resumed run included)")
    parser.add_argument("--max_minutes", type=positive_float, default=DEFAULTS["max_minutes"], help="stop (and save) after this many minutes")
    parser.add_argument("--batch_size", type=positive_int, default=DEFAULTS["batch_size"],
                        help="global batch (at least 2: BatchNorm), split across processes when distributed")
    parser.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"], help="AdamW learning rate")
    parser.add_argument("--dispersion_lr", type=positive_float, default=DEFAULTS["dispersion_lr"],
                        help="learning rate of the negative-binomial decoder's per-gene dispersion (--loss_ae nb); "
                             "default: --lr")
    parser.add_argument("--refit_dispersion", type=str2bool, default=DEFAULTS["refit_dispersion"],
                        help="after training, refit the negative-binomial decoder's per-gene dispersion to maximum "
                             "likelihood on (at most 2,048 of) the training cells, every other weight frozen, and "
                             "store it in the model file to use (the learned one is kept in its dispersion_fit); "
                             "the mse decoder has none")
    parser.add_argument("--weight_decay", type=non_negative_float, default=DEFAULTS["weight_decay"], help="AdamW weight decay")
    parser.add_argument("--seed", type=non_negative_int, default=DEFAULTS["seed"],
                        help="seed of the initial weights, the validation split and the data order")
    parser.add_argument("--checkpoint_freq", type=positive_int, default=DEFAULTS["checkpoint_freq"],
                        help="steps between checkpoints (one is also saved at the end); alias --save_interval")
    add_alias(parser, "--save_interval", "checkpoint_freq", type=positive_int)
    parser.add_argument("--log_interval", type=positive_int, default=DEFAULTS["log_interval"],
                        help="steps between rows of train_log.csv (training and validation loss)")
    parser.add_argument("--state_dict", default=DEFAULTS["state_dict"],
                        help="autoencoder checkpoint to start from (resumes optimizer, data order and step when its "
                             "opt_*.pt is present), or a --save_dir (its newest checkpoint of this --seed); "
                             "alias --resume_checkpoint")
    add_alias(parser, "--resume_checkpoint", "state_dict")
    parser.add_argument("--init_from", default=DEFAULTS["init_from"],
                        help="start a new run from another autoencoder's weights (a model_seed=*.pt, e.g. one "
                             "pretrained on a larger compatible atlas), genes and decoder labels matched by name: "
                             "genes it lacks start fresh (at least half of the data's genes must be shared); it must "
                             "have the same --hidden_dims, --latent_dim and count model; a fresh optimizer and step 0 "
                             "(to continue a run, --state_dict)")
    parser.add_argument("--resume_on_new_data", type=str2bool, default=DEFAULTS["resume_on_new_data"],
                        help="resume although --data_dir differs from the data the checkpoint was trained on (other "
                             "cells, order or values; recorded in the checkpoint); refused otherwise")
    parser.add_argument("--start_step", type=non_negative_int, default=DEFAULTS["start_step"], help="override the starting step")
    parser.add_argument("--overwrite", type=str2bool, default=DEFAULTS["overwrite"],
                        help="start afresh in a --save_dir that holds checkpoints, deleting them")
    parser.add_argument("--loss_ae", default=DEFAULTS["loss_ae"], choices=["auto", "nb", "mse"],
                        help="reconstruction loss: nb = negative-binomial likelihood of the raw counts (the decoder "
                             "can then draw realistic counts), mse = squared error on log-normalized values (the "
                             "original); auto = nb for raw counts, mse for --input_is_log True")
    parser.add_argument("--decoder_activation", default=DEFAULTS["decoder_activation"], choices=["ReLU", "linear"],
                        help="output activation of the mse decoder")
    parser.add_argument("--latent_dim", type=positive_int, default=DEFAULTS["latent_dim"], help="size of the latent")
    parser.add_argument("--hidden_dims", type=positive_int, nargs="+", default=DEFAULTS["hidden_dims"],
                        help="encoder widths (the decoder mirrors them)")
    parser.add_argument("--kl_weight", type=non_negative_float, default=DEFAULTS["kl_weight"],
                        help="0: the deterministic autoencoder (L2-normalized latent); > 0: a variational autoencoder "
                             "whose loss adds this weight x the KL divergence of its Gaussian posterior per cell "
                             "(over the number of genes: 1 is the evidence lower bound); its latent is the posterior "
                             "mean")
    parser.add_argument("--latent_norm", default=DEFAULTS["latent_norm"], choices=["sphere", "none"],
                        help="the deterministic autoencoder's latent: sphere = L2-normalized (the original), none = "
                             "the encoder's linear output (ignored with --kl_weight > 0)")
    parser.add_argument("--decoder_label_key", default=DEFAULTS["decoder_label_key"],
                        help="an obs column (e.g. cell_type), or several separated by commas (cell_type1,donor), "
                             "whose values the decoder reads beside the latent: a learned shift per value of every "
                             "decoder layer, summed over the keys; the diffusion model must then be conditioned on "
                             "each (cell_train.py --label_key), and decoding needs each cell's values. auto: "
                             "cell_type1 when the data has it, else none; none: the decoder reads the latent only "
                             "(the original)")
    parser.add_argument("--encoder_genes", type=non_negative_int, default=DEFAULTS["encoder_genes"],
                        help="the encoder reads only this many genes, the most variable of the training cells "
                             "(scanpy's Seurat-flavour dispersion of the log-normalized expression); the decoder "
                             "still outputs every gene. 0: every gene (the original)")
    parser.add_argument("--dropout", type=fraction, default=DEFAULTS["dropout"], help="dropout after each hidden layer")
    parser.add_argument("--precision", default=DEFAULTS["precision"], choices=["auto", "fp32", "bf16"],
                        help="matmuls of the training step: bf16 (autocast, fp32 master weights and loss), fp32, or "
                             "auto = bf16 where the device runs it natively (AMX / AVX512-BF16 CPUs, CUDA)")
    parser.add_argument("--val_fraction", type=fraction, default=DEFAULTS["val_fraction"],
                        help="cells of --data_dir set aside for the validation loss (never trained on)")
    parser.add_argument("--early_stopping_patience", type=non_negative_int, default=DEFAULTS["early_stopping_patience"],
                        help="0 = off; else keep the weights of the lowest validation loss (checked at every log "
                             "row) in model_seed=S_best.pt and stop when it has not improved for this many steps "
                             "(--max_steps stays the cap); use the _best.pt file downstream")
    parser.add_argument("--latent_noise", type=non_negative_float, default=DEFAULTS["latent_noise"],
                        help="training only: the decoder reads each latent plus Gaussian noise of this standard "
                             "deviation per coordinate (latents have norm 1: a coordinate is ~0.09 for 128 dims), so "
                             "it decodes latents near the training cells' too, as the diffusion model's are; "
                             "0 = off (the original)")
    parser.add_argument("--count_thinning", type=fraction, default=DEFAULTS["count_thinning"],
                        help="training only (--loss_ae nb): at every step each training cell keeps a share, drawn "
                             "uniformly between 1 - this and 1, of its counts (binomial thinning: a thinned "
                             "negative-binomial count is negative binomial with the same dispersion), and the encoder "
                             "reads the thinned cell; the validation loss and the dispersion refit use the cells as "
                             "they are; 0 = off")
    parser.add_argument("--count_split", type=fraction, default=DEFAULTS["count_split"],
                        help="training only (--loss_ae nb): at every step each training cell's counts are split at "
                             "random, each count going to the encoder with this probability; the decoder is scored "
                             "on the rest, which shares the cell's expression but not its sampling noise, so it "
                             "cannot learn to reproduce a cell's own noise; the validation loss is taken on one fixed "
                             "split; 0 = off")
    parser.add_argument("--ema_rate", type=fraction, default=DEFAULTS["ema_rate"],
                        help="0 = off; else the model used is an exponential moving average of the weights at this "
                             "decay (e.g. 0.99, warming up from 0.1): the validation loss, early stopping, the "
                             "checkpoints' weights and the dispersion refit all read the average, which smooths "
                             "the last steps' noise out of the decoder; the running weights travel in the "
                             "checkpoints for resuming (no gain on the bundled datasets at the default "
                             "--lr: docs/fidelity.md)")
    parser.add_argument("--variable_gene_weight", type=positive_float, default=DEFAULTS["variable_gene_weight"],
                        help="--loss_ae nb: the negative-binomial likelihood of the 2,000 most variable genes of the "
                             "training cells (the evaluation's feature genes) weighted this many times each other "
                             "gene's, weights scaled to mean 1; the validation loss and early stopping use the same "
                             "weights, the dispersion refit (per gene) is unaffected; 1 = off")
    parser.add_argument("--progress", type=str2bool, default=DEFAULTS["progress"], help="show a progress bar")
    add_threads_arg(parser, deterministic=True)
    add_device_arg(parser)
    add_debug_arg(parser)
    return parser


def add_alias(parser, flag, dest, **kwargs):
    """``flag`` sets ``dest`` too (the diffusion trainer's name for it); not listed separately in --help."""
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_thread_flags(args)
    with settings_worded_as_flags():
        path, report, seconds = train_autoencoder(from_flags(DataConfig, args), from_flags(AutoencoderModelConfig, args),
                                                  from_flags(AutoencoderTrainingConfig, args))
    if not setup_distributed(args.device).is_main:
        return path
    print(f"saved {(report or {}).get('last_path', path)} ({seconds:.1f} s)")
    if report and "best_step" in report:
        print(f"best validation loss {report['best_val_loss']:.5f} at step {report['best_step']}: "
              f"{report['best_path']} (use it as --vae_path)")
    if report:
        print(f"held-out reconstruction on {report['n_cells']} cells: MSE {report['mse']:.4f}, "
              f"median per-cell Pearson {report['median_cell_pearson']:.4f}")
    return path


if __name__ == "__main__":
    main()
