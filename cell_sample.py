"""Generate cells with a trained cfDiffusion model: latents per condition and a decoded, labelled h5ad.

    python cell_sample.py --model_path checkpoint/diffusion/baron/model800000.pt --sample_dir output/baron \\
        --num_classes 14 --branch 0 --cache_interval 5 --non_uniform False

Sampler (--sampler; docs/sampling.md): by default dpmpp2m_sde (SDE-DPM-Solver++(2M)) on 10 steps evenly spaced in
log-SNR (--timestep_respacing logsnr10), the checkpoint's cache interval scaled to them (5 of 1000 steps -> 1 of
10) and bf16 matmuls where the device runs them natively; --sampler dpmpp2m is its deterministic (ODE) form,
--sampler ddpm --timestep_respacing 50 ancestral DDPM on 50 steps, and the original sampler is
--sampler ddpm --timestep_respacing 1000 --cache_interval 5 --precision fp32. The original flags still choose it
as before: --use_ddim True (ddim), --solver, and --timestep_respacing alone (N: ddpm, logsnrN: dpmpp2m_sde).
Output: counts drawn from the count autoencoder (X log-normalized, layers['counts']), or the decoded mean
(--observation mean), and manifest.json, written last: a folder without it holds no complete run; both record
the sampler that ran, its steps and spacing and every setting that took effect. The new set is written
whole into a staging folder inside --sample_dir and swapped in only when complete: a full disk, an error, Ctrl-C
or a kill keeps the folder's earlier set. The folder is locked while a run writes into it: a second run is refused.

Conditions: by default every class (one label key) or every combination seen in training (several keys).
--condition cell_type1=beta,donor=human1 generates one condition (repeat the flag for more); a key left
out stays unconditioned (a missing value in obs). --match_counts generates as many cells per condition as
training had. Several processes (torchrun --nproc_per_node N cell_sample.py ... or mpiexec -n N python
cell_sample.py ...) split the batches; rank 0 writes the same output as one process with the same --seed
and --batch_size.
"""
import argparse

from guided_diffusion.cli import (ArgumentParser, add_debug_arg, add_device_arg, add_threads_arg, apply_thread_flags,
                                  command, non_negative_float, non_negative_int, positive_int, str2bool,
                                  terminate_as_exception)
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.core.errors import settings_worded_as_flags
from guided_diffusion.sampling.settings import (ETA_SAMPLERS, GUIDANCE_FORMS, SAMPLERS, SOLVERS, parse_guide_w,
                                                parse_interval)
from guided_diffusion.sampling.writer import COMPRESSIONS
from guided_diffusion.sampling.settings import DEFAULT_SETTINGS, OBSERVATIONS, SamplerSettings
from guided_diffusion.core.device import PRECISIONS
from guided_diffusion.sampling.request import SamplingRequest
from guided_diffusion.sampling.pipeline import sample_cells


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, every flag's default shown."""


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model_path", required=True, help="model{step}.pt (or ema_*.pt) from cell_train.py")
    parser.add_argument("--sample_dir", default="output",
                        help="folder for the latents, generated.h5ad and manifest.json (an earlier run's outputs "
                             "there are replaced once the new set is complete; one run at a time)")
    parser.add_argument("--vae_path", default="",
                        help="autoencoder (empty: the one recorded in the checkpoint, or a file of its name "
                             "beside the model)")
    parser.add_argument("--num_classes", type=positive_int, nargs="+", default=None,
                        help="classes per label key; implied by the checkpoint, checked if given")
    parser.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="one condition to generate (repeat for more; each condition and key once); "
                             "default: every condition seen in training")
    parser.add_argument("--all_combinations", type=str2bool, default=False,
                        help="every combination of label values, also ones unseen in training (a notice names them; "
                             "not with --condition)")
    parser.add_argument("--match_counts", type=str2bool, nargs="?", const=True, default=False,
                        help="as many cells per condition as the training data had (not with --num_samples)")
    parser.add_argument("--num_samples", type=positive_int, default=argparse.SUPPRESS,
                        help="cells per condition; not with --match_counts (default: 1000)")
    parser.add_argument("--batch_size", type=positive_int, default=DEFAULT_SETTINGS.batch_size,
                        help="cells per reverse-process batch (memory per step; results depend on it)")
    parser.add_argument("--guide_w", type=parse_guide_w, default=DEFAULT_SETTINGS.guide_w, metavar="W|KEY=W[,KEY=W]",
                        help="classifier-free guidance weight, finite, in [-1, 100] (typically 0 to 5): one for every "
                             "label key, or one per key (cell_type1=1,donor=2; keys not named get 0; nested "
                             "per-key guidance, README section 3)")
    parser.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                        help="the reverse process: ddpm (ancestral), ddim (--eta sets its noise), dpmpp2m "
                             "(DPM-Solver++(2M), deterministic, one network evaluation per step) or dpmpp2m_sde (its "
                             "stochastic form, fresh noise at every step); default: chosen by --use_ddim, --solver and "
                             "--timestep_respacing as before, dpmpp2m_sde on the default logsnr10 steps")
    parser.add_argument("--timestep_respacing", default=DEFAULT_SETTINGS.timestep_respacing,
                        help="the sampled steps, taken from the checkpoint's schedule: N (N steps evenly spaced, e.g. "
                             "50; 1000 = all), ddimN (N evenly strided steps) or logsnrN (N steps evenly spaced in "
                             "log-SNR, for dpmpp2m and dpmpp2m_sde); without --sampler, N runs ddpm and logsnrN "
                             "dpmpp2m_sde")
    parser.add_argument("--use_ddim", type=str2bool, default=None,
                        help="the original flag: True = --sampler ddim (with ddimN or N steps)")
    parser.add_argument("--solver", default=None, choices=list(SOLVERS),
                        help="the earlier spelling of --sampler: dpmpp2m and dpmpp2m_sde as there; ddpm: ddpm, or "
                             "ddim with --use_ddim True; auto: as without it")
    parser.add_argument("--eta", type=non_negative_float, default=DEFAULT_SETTINGS.eta,
                        help=f"DDIM's noise (0: deterministic); only --sampler {', '.join(ETA_SAMPLERS)} uses it")
    parser.add_argument("--clip_denoised", type=str2bool, default=False,
                        help="clamp each predicted x0 to the latent scale")
    parser.add_argument("--use_ema", type=str2bool, default=True, help="sample the EMA weights (else the raw ones)")
    parser.add_argument("--branch", type=non_negative_int, default=None,
                        help="feature-cache branch (None: recorded in the checkpoint)")
    parser.add_argument("--cache_interval", type=int, default=None,
                        help="refresh the deep features every N sampled steps (1 = no reuse); None: the "
                             "checkpoint's interval, which counts steps of the full schedule, scaled to the "
                             "sampled steps (5 -> 1 at 50 of 1000 steps)")
    parser.add_argument("--non_uniform", type=str2bool, default=None,
                        help="non-uniform cache refreshes (None: recorded in the checkpoint)")
    parser.add_argument("--observation", default=DEFAULT_SETTINGS.observation, choices=OBSERVATIONS,
                        help="counts: draw counts from the autoencoder's negative binomial (X = their log-normalized "
                             "values, layers['counts'] = the counts); mean: the decoded mean expression; "
                             "auto: counts for autoencoders trained with --loss_ae nb, else mean")
    parser.add_argument("--precision", default=DEFAULT_SETTINGS.precision, choices=PRECISIONS,
                        help="the denoiser's matrix multiplications in fp32 or bf16 (torch.autocast; the diffusion "
                             "updates and every output stay fp32; see --decoder_precision); auto: bf16 where the device runs it natively (CPUs with "
                             "AMX/AVX512-BF16, CUDA GPUs with bf16), else fp32")
    parser.add_argument("--decoder_precision", default=DEFAULT_SETTINGS.decoder_precision, choices=PRECISIONS,
                        help="the count decoder's output layer (1024 x genes, most of the decoding work) in fp32 or "
                             "bf16 (its logits move by ~2^-9 of their size, far below the count draws' noise; "
                             "docs/sampling.md); auto: bf16 when --precision resolves to bf16 and "
                             "counts are drawn, else fp32 (decoded means are always fp32)")
    parser.add_argument("--guidance_form", default=DEFAULT_SETTINGS.guidance_form, choices=list(GUIDANCE_FORMS),
                        help="how guidance combines several label keys (docs/sampling.md): nested (each key's term "
                             "given the keys before it; queries the full combination), composed (a product of the "
                             "single-key predictions; never queries the full combination), auto: composed for "
                             "conditions never seen in training, nested for the others")
    parser.add_argument("--unseen_guide_w", type=parse_unseen_guide_w, default=None,
                        help="the guidance weights of conditions never seen in training (composed form; not with "
                             "--guidance_form nested): one number or KEY=W[,KEY=W] as --guide_w; default (auto): "
                             "the weights recorded in the checkpoint by exp_script/guidance_sweep.py --record True, "
                             "else the first label key's --guide_w weight and 4 for every later key "
                             "(docs/sampling.md, 'Unseen combinations')")
    parser.add_argument("--unseen_guidance_interval", type=parse_unseen_interval, default=None,
                        help="LO,HI: the part of the noise schedule (fractions: 0 = no noise, 1 = pure noise) where "
                             "--unseen_guide_w applies; at the other steps unseen conditions take the composed form "
                             "with every weight 0; 0,1 guides every step. Default (auto): the interval recorded with "
                             "the checkpoint's weights, else 0,0.5 (docs/sampling.md, 'Unseen combinations')")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of every random stream (noise, count draws, library sizes)")
    parser.add_argument("--compression", default="none", choices=COMPRESSIONS,
                        help="compression of generated.h5ad's matrices (none: fastest; lzf / gzip: smaller, slower; "
                             "docs/sampling.md)")
    parser.add_argument("--progress", type=str2bool, default=True, help="show progress bars")
    add_device_arg(parser)
    add_threads_arg(parser)
    add_debug_arg(parser)
    return parser


def parse_unseen_guide_w(text):
    """``--unseen_guide_w``: ``auto`` (the default rule) or weights as ``--guide_w`` takes them."""
    return None if str(text).strip().lower() == "auto" else parse_guide_w(text)


def parse_unseen_interval(text):
    """``--unseen_guidance_interval``: ``auto`` (the checkpoint's or the default) or ``LO,HI``."""
    return None if str(text).strip().lower() == "auto" else parse_interval(text)


def settings_from_args(args):
    return SamplerSettings(guide_w=args.guide_w, sampler=args.sampler, use_ddim=args.use_ddim,
                           timestep_respacing=args.timestep_respacing,
                           eta=args.eta, cache_interval=args.cache_interval, branch=args.branch,
                           non_uniform=args.non_uniform, clip_denoised=args.clip_denoised,
                           batch_size=args.batch_size, seed=args.seed, observation=args.observation,
                           precision=args.precision, solver=args.solver, decoder_precision=args.decoder_precision,
                           guidance_form=args.guidance_form, unseen_guide_w=args.unseen_guide_w,
                           unseen_guidance_interval=args.unseen_guidance_interval)


def request_from_args(args):
    return SamplingRequest(model_path=args.model_path, sample_dir=args.sample_dir, vae_path=args.vae_path,
                           use_ema=args.use_ema, num_classes=args.num_classes, conditions=args.condition,
                           all_combinations=args.all_combinations, match_counts=args.match_counts,
                           num_samples=getattr(args, "num_samples", None), device=args.device, progress=args.progress,
                           compression=args.compression)


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_thread_flags(args)
    check_writable_dir(args.sample_dir, "--sample_dir")
    with terminate_as_exception(), settings_worded_as_flags({"conditions": "--condition"}):
        # SIGTERM removes this run's temporaries, as Ctrl-C does; library errors are worded as flags
        return sample_cells(request_from_args(args), settings_from_args(args))


if __name__ == "__main__":
    main()
