"""Generate cells with a trained cfDiffusion model: latents per condition and a decoded, labelled h5ad.

    python cell_sample.py --model_path checkpoint/diffusion/baron/model800000.pt --sample_dir output/baron \
        --num_classes 14 --branch 0 --cache_interval 5 --non_uniform False

Sampler: by default ancestral DDPM on 50 respaced steps, the checkpoint's cache interval scaled to them
(5 of 1000 steps -> 1 of 50) and bf16 matmuls where the device runs them natively (measured as faithful
as the original 1000-step sampler, 17x faster); the original sampler is
--use_ddim False --timestep_respacing 1000 --cache_interval 5 --precision fp32. Output: counts drawn from
the count autoencoder (X log-normalized, layers['counts']), or the decoded mean (--observation mean).

Conditions: by default every class (one label key) or every combination seen in training (several keys).
--condition cell_type1=beta,donor=human1 generates one condition (repeat the flag for more); a key left
out stays unconditioned. --match_counts generates as many cells per condition as training had.
Several processes (torchrun --nproc_per_node N cell_sample.py ... or mpiexec -n N python cell_sample.py ...)
split the batches; rank 0 writes the same output as one process with the same --seed and --batch_size.
"""
import argparse

import torch

from guided_diffusion.cli import (ArgumentParser, UsageError, add_debug_arg, add_device_arg, check_writable_dir,
                                  command, non_negative_float, non_negative_int, positive_int, str2bool)
from guided_diffusion.dist_util import setup_distributed
from guided_diffusion.sampling import (DEFAULT_SETTINGS, FAITHFUL_FLAGS, OBSERVATIONS, PRECISIONS, SamplerSettings,
                                       describe_condition, generate, load_diffusion_model, plan_conditions,
                                       resolve_autoencoder, resolve_settings)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="model{step}.pt (or ema_*.pt) from cell_train.py")
    parser.add_argument("--sample_dir", default="output", help="folder for the latents and generated.h5ad")
    parser.add_argument("--vae_path", default="", help="autoencoder (default: the one recorded in the checkpoint)")
    parser.add_argument("--num_classes", type=positive_int, nargs="+", default=None,
                        help="classes per label key; implied by the checkpoint, checked if given")
    parser.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--all_combinations", type=str2bool, default=False,
                        help="every combination of label values, also ones unseen in training")
    parser.add_argument("--match_counts", type=str2bool, nargs="?", const=True, default=False,
                        help="as many cells per condition as the training data had")
    parser.add_argument("--num_samples", type=positive_int, default=1000, help="cells per condition")
    parser.add_argument("--batch_size", type=positive_int, default=DEFAULT_SETTINGS.batch_size)
    parser.add_argument("--guide_w", type=float, default=DEFAULT_SETTINGS.guide_w, help="classifier-free guidance weight")
    parser.add_argument("--use_ddim", type=str2bool, default=DEFAULT_SETTINGS.use_ddim)
    parser.add_argument("--timestep_respacing", default=DEFAULT_SETTINGS.timestep_respacing,
                        help=f"sampling steps taken from the 1000 training steps, e.g. 250, or ddim50 with "
                             f"--use_ddim True (default: {DEFAULT_SETTINGS.timestep_respacing}; the original "
                             f"1000-step sampler: {FAITHFUL_FLAGS})")
    parser.add_argument("--solver", default=DEFAULT_SETTINGS.solver, choices=["", "dpmpp2m"],
                        help="dpmpp2m: DPM-Solver++(2M), deterministic, one network evaluation per step (e.g. "
                             "--timestep_respacing logsnr15: 15 steps evenly spaced in log-SNR); overrides --use_ddim")
    parser.add_argument("--eta", type=non_negative_float, default=DEFAULT_SETTINGS.eta, help="DDIM eta")
    parser.add_argument("--clip_denoised", type=str2bool, default=False)
    parser.add_argument("--use_ema", type=str2bool, default=True)
    parser.add_argument("--branch", type=non_negative_int, default=None, help="default: recorded in the checkpoint")
    parser.add_argument("--cache_interval", type=int, default=None,
                        help="refresh the deep features every N sampled steps (1 = no reuse); default: the "
                             "checkpoint's interval, which counts steps of the 1000-step schedule, scaled to the "
                             "sampled steps (5 -> 1 at 50 steps)")
    parser.add_argument("--non_uniform", type=str2bool, default=None, help="default: recorded in the checkpoint")
    parser.add_argument("--observation", default=DEFAULT_SETTINGS.observation, choices=OBSERVATIONS,
                        help="counts: draw counts from the autoencoder's negative binomial (X = their log-normalized "
                             "values, layers['counts'] = the counts); mean: the decoded mean expression; "
                             "auto: counts for autoencoders trained with --loss_ae nb, else mean")
    parser.add_argument("--precision", default=DEFAULT_SETTINGS.precision, choices=PRECISIONS,
                        help="matrix multiplications in fp32 or bf16 (torch.autocast); auto: bf16 where the device "
                             "runs it natively (CPUs with AMX/AVX512-BF16, CUDA GPUs with bf16), else fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", type=str2bool, default=True)
    add_device_arg(parser)
    add_debug_arg(parser)
    return parser


def settings_from_args(args):
    return SamplerSettings(guide_w=args.guide_w, use_ddim=args.use_ddim, timestep_respacing=args.timestep_respacing,
                           eta=args.eta, cache_interval=args.cache_interval, branch=args.branch,
                           non_uniform=args.non_uniform, clip_denoised=args.clip_denoised,
                           batch_size=args.batch_size, seed=args.seed, observation=args.observation,
                           precision=args.precision, solver=args.solver)


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_writable_dir(args.sample_dir, "--sample_dir")
    context = setup_distributed(args.device)
    device = context.device
    torch.manual_seed(args.seed)
    loaded = load_diffusion_model(args.model_path, use_ema=args.use_ema, device=device)
    if args.num_classes is not None and list(args.num_classes) != list(loaded.model.condition_sizes):
        raise UsageError(f"--num_classes {' '.join(map(str, args.num_classes))} contradicts the checkpoint "
                         f"({' '.join(map(str, loaded.model.condition_sizes))}); omit it")
    settings = resolve_settings(settings_from_args(args), loaded.payload["sampling_defaults"], device)
    plan = plan_conditions(loaded, args.condition, args.all_combinations, args.match_counts, args.num_samples)
    autoencoder = resolve_autoencoder(loaded, args.vae_path, device)
    if context.is_main:
        print(f"generating {sum(n for _, n in plan)} cells in {len(plan)} conditions with {settings.describe()}")
    path, _ = generate(loaded, autoencoder, plan, settings, args.sample_dir, progress=args.progress, context=context)
    if not context.is_main:
        return path
    for row, count in plan[:20]:
        print(f"  {describe_condition(row, loaded.label_keys, loaded.vocabularies)}: {count}")
    if len(plan) > 20:
        print(f"  ... and {len(plan) - 20} more conditions")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
