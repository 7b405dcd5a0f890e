"""Train the conditional latent diffusion model on an h5ad file.

    python cell_train.py --data_dir dataset/baron_human.h5ad --vae_path checkpoint/AE/model_seed=0_step=200000.pt \
        --model_name baron --save_dir checkpoint/diffusion --lr_anneal_steps 800000 \
        --num_classes 14 --branch 0 --cache_interval 5 --non_uniform False

Several conditions: repeat --label_key (e.g. --label_key cell_type1 --label_key donor).
Several processes: torchrun --nproc_per_node N cell_train.py ... or mpiexec -n N python cell_train.py ...;
files larger than memory: --backed True (see docs/scaling.md).
"""
from guided_diffusion.training.pipeline import train_diffusion
from guided_diffusion.cli import (ArgumentParser, HelpFormatter, add_debug_arg, add_device_arg, command, fraction,
                                  non_negative_float, non_negative_int, positive_float, positive_int, probability,
                                  str2bool)
from guided_diffusion.data.flags import add_data_args, backed_mode
from guided_diffusion.core.distributed import setup_distributed
from guided_diffusion.cli import add_threads_arg, apply_thread_flags
from guided_diffusion.training.config import defaults_of, DataConfig, DiffusionModelConfig, DiffusionTrainingConfig, from_flags
from guided_diffusion.core.errors import settings_worded_as_flags

# the flags' defaults are the settings' (guided_diffusion/training/config.py), stated once
DEFAULTS = defaults_of(DiffusionModelConfig, DiffusionTrainingConfig)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(parser)
    parser.add_argument("--vae_path", required=True, help="autoencoder checkpoint (VAE/VAE_train.py)")
    parser.add_argument("--save_dir", default=DEFAULTS["save_dir"], help="files go to save_dir/model_name/")
    parser.add_argument("--model_name", default=DEFAULTS["model_name"], help="files go to save_dir/model_name/")
    parser.add_argument("--num_classes", type=positive_int, nargs="+", default=DEFAULTS["num_classes"],
                        help="classes per label key; inferred from the data, checked if given")
    parser.add_argument("--lr_anneal_steps", type=non_negative_int, default=DEFAULTS["lr_anneal_steps"],
                        help="train this many steps, the LR falling linearly to 0 (0: no end, constant LR)")
    parser.add_argument("--batch_size", type=positive_int, default=DEFAULTS["batch_size"],
                        help="global batch, split across processes under torchrun/mpiexec")
    parser.add_argument("--microbatch", type=int, default=DEFAULTS["microbatch"], help="split batches for memory (-1: off)")
    parser.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"], help="AdamW learning rate (at step 0)")
    parser.add_argument("--weight_decay", type=non_negative_float, default=DEFAULTS["weight_decay"], help="AdamW weight decay")
    parser.add_argument("--ema_rate", type=probability, default=DEFAULTS["ema_rate"], help="decay of the EMA weights")
    parser.add_argument("--p_uncond", type=probability, default=DEFAULTS["p_uncond"],
                        help="probability of dropping each label key (classifier-free guidance)")
    parser.add_argument("--hidden_dims", type=positive_int, nargs="+", default=DEFAULTS["hidden_dims"],
                        help="widths of the denoiser's blocks")
    parser.add_argument("--latent_scale", default=DEFAULTS["latent_scale"],
                        help="multiply the latents by this for diffusion; 'auto' = unit variance (1 = original)")
    parser.add_argument("--dropout", type=fraction, default=DEFAULTS["dropout"], help="dropout in the denoiser")
    parser.add_argument("--save_interval", type=positive_int, default=DEFAULTS["save_interval"],
                        help="steps between checkpoints (one is also saved at the end)")
    parser.add_argument("--log_interval", type=positive_int, default=DEFAULTS["log_interval"], help="steps between rows of train_log.csv")
    parser.add_argument("--resume_checkpoint", default=DEFAULTS["resume_checkpoint"],
                        help="model{step}.pt to resume from, or its folder (the newest complete checkpoint)")
    parser.add_argument("--resume_on_new_data", type=str2bool, default=DEFAULTS["resume_on_new_data"],
                        help="resume although --data_dir differs from the data the checkpoint was trained on (other "
                             "cells, order or values; recorded in the checkpoint, which keeps its latent scale); "
                             "refused otherwise")
    parser.add_argument("--overwrite", type=str2bool, default=DEFAULTS["overwrite"],
                        help="start afresh in a save_dir/model_name that holds checkpoints, deleting them")
    parser.add_argument("--max_minutes", type=positive_float, default=DEFAULTS["max_minutes"], help="stop (and save) after this many minutes")
    parser.add_argument("--seed", type=non_negative_int, default=DEFAULTS["seed"],
                        help="seed of the initial weights, the data order, label dropout, timesteps and noise")
    sampling = parser.add_argument_group("sampling defaults recorded in the checkpoint")
    sampling.add_argument("--branch", type=non_negative_int, default=DEFAULTS["branch"], help="feature-cache branch")
    sampling.add_argument("--cache_interval", type=positive_int, default=DEFAULTS["cache_interval"],
                          help="steps between full evaluations when reusing features")
    sampling.add_argument("--non_uniform", type=str2bool, default=DEFAULTS["non_uniform"], help="non-uniform cache schedule")
    parser.add_argument("--precision", default=DEFAULTS["precision"], choices=["auto", "fp32", "bf16"],
                        help="matmuls of the training step: bf16 (autocast, fp32 master weights and loss), fp32, or "
                             "auto = bf16 where the device runs it natively (AMX / AVX512-BF16 CPUs, CUDA)")
    parser.add_argument("--latents_on_disk", type=backed_mode, default=DEFAULTS["latents_on_disk"], metavar="{auto,True,False}",
                        help="keep the encoded latents in save_dir/model_name/latents.npy and read them per batch, so "
                             "memory does not grow with the cells; reused by a resumed run with the same data, "
                             "autoencoder and normalization (auto: when the h5ad is streamed, see --backed)")
    parser.add_argument("--progress", type=str2bool, default=DEFAULTS["progress"], help="show progress bars")
    add_threads_arg(parser, deterministic=True)
    add_device_arg(parser)
    add_debug_arg(parser)
    return parser


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_thread_flags(args)
    with settings_worded_as_flags():
        path = train_diffusion(from_flags(DataConfig, args), from_flags(DiffusionModelConfig, args),
                               from_flags(DiffusionTrainingConfig, args))
    if setup_distributed(args.device).is_main:
        print(f"saved {path}")
    return path


if __name__ == "__main__":
    main()
