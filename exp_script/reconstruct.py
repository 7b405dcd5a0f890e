r"""Encode real cells and decode them again: the autoencoder's ceiling, scored like generated cells.

    python exp_script/reconstruct.py --vae_path checkpoint/demo/latest/autoencoder/model_seed=0_step=600.pt \
        --data_dir dataset/baron_human.h5ad --out output/reconstruction.h5ad
    python exp_script/evaluate.py --real dataset/baron_human.h5ad --generated output/reconstruction.h5ad \
        --out output/reconstruction_evaluation

Writes an h5ad in the sampler's format (labels in obs). With a count autoencoder (--loss_ae nb) and
--observation counts (the default for it), counts are drawn for each cell's own total count.
"""
import argparse
import os

from exp_script.evaluation import reconstruction
from guided_diffusion.cli import ArgumentParser, add_debug_arg, add_device_arg, command, str2bool
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.core.device import resolve_device
from guided_diffusion.data.flags import add_data_args, dataset_from_args
from guided_diffusion.sampling.settings import OBSERVATIONS
from VAE.VAE_model import load_autoencoder


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--vae_path", required=True, help="autoencoder checkpoint (VAE/VAE_train.py)")
    parser.add_argument("--out", required=True, help="output .h5ad")
    parser.add_argument("--observation", default="auto", choices=OBSERVATIONS,
                        help="counts: draw counts for each cell's total; mean: decoded mean expression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=str2bool, default=True)
    add_device_arg(parser)
    add_debug_arg(parser)
    return parser


def reconstruct(args):
    """Encode and decode every cell of ``--data_dir``; returns the output path."""
    device = resolve_device(args.device)
    autoencoder, _ = load_autoencoder(args.vae_path, device=device)
    dataset = dataset_from_args(args)
    return reconstruction.reconstruct(autoencoder, dataset, args.out, observation=args.observation, seed=args.seed,
                                      progress=args.progress, data_path=args.data_dir, vae_path=args.vae_path)


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    path = reconstruct(args)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
