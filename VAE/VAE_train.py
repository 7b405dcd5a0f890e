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
from guided_diffusion.training.config import AutoencoderModelConfig, AutoencoderTrainingConfig, DataConfig, from_flags
from guided_diffusion.core.errors import settings_worded_as_flags
from VAE.autoencoder_training import train_autoencoder


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(parser, labels=False)
    parser.add_argument("--num_genes", type=positive_int, default=None,
                        help="number of genes; inferred from the data, checked if given")
    parser.add_argument("--save_dir", required=True, help="folder for checkpoints and train_log.csv")
    parser.add_argument("--max_steps", type=positive_int, default=200000,
                        help="optimizer steps to train for (the step count of a resumed run included)")
    parser.add_argument("--max_minutes", type=positive_float, default=None, help="stop (and save) after this many minutes")
    parser.add_argument("--batch_size", type=positive_int, default=128,
                        help="global batch (at least 2: BatchNorm), split across processes when distributed")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--weight_decay", type=non_negative_float, default=1e-5, help="AdamW weight decay")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the initial weights, the validation split and the data order")
    parser.add_argument("--checkpoint_freq", type=positive_int, default=50000,
                        help="steps between checkpoints (one is also saved at the end); alias --save_interval")
    add_alias(parser, "--save_interval", "checkpoint_freq", type=positive_int)
    parser.add_argument("--log_interval", type=positive_int, default=100,
                        help="steps between rows of train_log.csv (training and validation loss)")
    parser.add_argument("--state_dict", default="",
                        help="autoencoder checkpoint to start from (resumes optimizer, data order and step when its "
                             "opt_*.pt is present), or a --save_dir (its newest checkpoint of this --seed); "
                             "alias --resume_checkpoint")
    add_alias(parser, "--resume_checkpoint", "state_dict")
    parser.add_argument("--resume_on_new_data", type=str2bool, default=False,
                        help="resume although --data_dir differs from the data the checkpoint was trained on (other "
                             "cells, order or values; recorded in the checkpoint); refused otherwise")
    parser.add_argument("--start_step", type=non_negative_int, default=None, help="override the starting step")
    parser.add_argument("--overwrite", type=str2bool, default=False,
                        help="start afresh in a --save_dir that holds checkpoints, deleting them")
    parser.add_argument("--loss_ae", default="auto", choices=["auto", "nb", "mse"],
                        help="reconstruction loss: nb = negative-binomial likelihood of the raw counts (the decoder "
                             "can then draw realistic counts), mse = squared error on log-normalized values (the "
                             "original); auto = nb for raw counts, mse for --input_is_log True")
    parser.add_argument("--decoder_activation", default="ReLU", choices=["ReLU", "linear"],
                        help="output activation of the mse decoder")
    parser.add_argument("--latent_dim", type=positive_int, default=128, help="size of the latent")
    parser.add_argument("--hidden_dims", type=positive_int, nargs="+", default=[1024, 1024, 1024],
                        help="encoder widths (the decoder mirrors them)")
    parser.add_argument("--dropout", type=fraction, default=0.0, help="dropout after each hidden layer")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="matmuls of the training step: bf16 (autocast, fp32 master weights and loss), fp32, or "
                             "auto = bf16 where the device runs it natively (AMX / AVX512-BF16 CPUs, CUDA)")
    parser.add_argument("--val_fraction", type=fraction, default=0.1,
                        help="cells of --data_dir set aside for the validation loss (never trained on)")
    parser.add_argument("--early_stopping_patience", type=non_negative_int, default=0,
                        help="0 = off; else keep the weights of the lowest validation loss (checked at every log "
                             "row) in model_seed=S_best.pt and stop when it has not improved for this many steps "
                             "(--max_steps stays the cap); use the _best.pt file downstream")
    parser.add_argument("--latent_noise", type=non_negative_float, default=0.0,
                        help="training only: the decoder reads each latent plus Gaussian noise of this standard "
                             "deviation per coordinate (latents have norm 1: a coordinate is ~0.09 for 128 dims), so "
                             "it decodes latents near the training cells' too, as the diffusion model's are; "
                             "0 = off (the original)")
    parser.add_argument("--progress", type=str2bool, default=True, help="show a progress bar")
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
