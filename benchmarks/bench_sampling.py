"""Sampling throughput: cells/s and useful GFLOP/s against the matmul peak measured in the same run.

    python benchmarks/bench_sampling.py            # full table (median of 3 runs per row)
    python benchmarks/bench_sampling.py --runs 1 --quick
    python benchmarks/bench_sampling.py --solvers    # only the solver / step-count rows beside the default
    python benchmarks/bench_sampling.py --draws --threads 1   # today's screened count draws beside the dense ones
    python benchmarks/bench_sampling.py --decoder --threads 2  # the bf16 output layer beside the fp32 one

Each row runs the whole sampling process of cell_sample.py — noise → guided reverse diffusion (with the
feature cache) → decoding to all genes streamed into an .h5ad — with a randomly initialised default-size
model (the cost does not depend on the weights): CellUNet [512, 512, 256, 128] over 128-d latents,
14 classes, guidance w=0.5 (conditional + unconditional halves), and the autoencoder decoder to 20,125 genes.
The decoder is the count model (--loss_ae nb) and counts are drawn as by default; so that the draws cost
what they cost on real data, its output bias holds the bundled Baron cells' mean gene shares and library
sizes are drawn from their totals (the cost of the draws grows with the number of non-zero counts).
Useful FLOPs are counted from the model's shapes: 2 x multiply-adds of the main-path Linear layers per
cell per step (full or shallow pass, doubled for guidance) plus the decoder's; per-timestep and
per-condition projections are not counted (they are amortised, or waste in the reference path).
Rows draw counts as cell_sample.py does now (screened draws, freed memory kept for reuse) except the
rows marked "dense count draws (before)" (a float32 uniform per entry over the whole chunk, glibc's
default allocator); ``--draws`` prints each beside the other with the reverse / output split. Rows run the
count decoder's output layer as cell_sample.py does (``--decoder_precision auto``: bf16 with bf16 denoiser
matmuls) unless marked "fp32 decoder"; ``--decoder`` prints the default and DDPM-50 with both.
"""
import os
import statistics
import tempfile
import time
from dataclasses import replace


import numpy as np
import pandas as pd
import torch

from benchmarks.baselines import writer_variant
from guided_diffusion.cli import ArgumentParser, HelpFormatter
from guided_diffusion.diffusion.denoiser import CellUNet
from guided_diffusion.diffusion.feature_cache import refresh_schedule
from guided_diffusion.diffusion.respace import create_diffusion
from guided_diffusion.sampling.settings import (DEFAULT_SETTINGS, SamplerSettings, resolve_decoder_precision,
                                                resolve_settings)
from guided_diffusion.sampling.reverse import sample_latents
from guided_diffusion.sampling.writer import write_decoded_h5ad
from guided_diffusion.core.memory import reuse_freed_memory
from VAE.VAE_model import VAE, Autoencoder
from guided_diffusion.data import Normalization

NUM_GENES = 20125
NUM_CLASSES = 14


class PerCellProjections(torch.nn.Module):
    """The straightforward computation (as the original code): every block's time and condition
    projections recomputed for every cell at every step. Same outputs, more multiply-adds."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.condition_sizes = model.condition_sizes
        self.latent_dim = model.latent_dim
        self.validate_branch = model.validate_branch
        self.make_cache = model.make_cache

    def condition_scales(self, cond):
        return None

    def forward(self, x, t, cond, cache=None, cond_scales=None):
        return self.model(x, t, cond, cache=cache, gather_embeddings=False)


def matmul_peak_gflops(size=2048, repeats=20, dtype=torch.float32):
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * repeats / best / 1e9


def decoder_macs(autoencoder_model):
    return sum(m.in_features * m.out_features for m in autoencoder_model.decoder if isinstance(m, torch.nn.Linear))


def useful_flops_per_cell(model, settings, decoder_mac_count):
    steps = create_diffusion(1000, settings.timestep_respacing or "1000").num_timesteps
    refresh = refresh_schedule(steps, settings.cache_interval, settings.non_uniform)
    full = model.macs_per_sample()
    shallow = model.macs_per_sample(shallow=True, branch=settings.branch) if settings.cache_interval > 1 else full
    passes = 2 if settings.guide_w != 0 else 1
    macs = sum(full if r else shallow for r in refresh) * passes + decoder_mac_count
    return 2 * macs


def baron_profile():
    """Log mean gene shares and total counts of the bundled Baron cells (for realistic count draws)."""
    from guided_diffusion.data import load_dataset

    dataset = load_dataset(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dataset",
                                        "baron_human.h5ad"), label_keys=[])
    _, counts, totals = dataset.rows_and_counts(np.arange(dataset.n_cells))
    shares = (counts / totals[:, None]).mean(axis=0)
    return np.log(np.maximum(shares, 1e-9)), totals


def run_once(model, autoencoder, settings, n_cells, folder, totals, count_draws="screened", stages=None):
    cond = (torch.arange(n_cells) % NUM_CLASSES)[:, None]
    noise = torch.randn(n_cells, model.latent_dim, generator=torch.Generator().manual_seed(0))
    obs = pd.DataFrame({"cell_type1": pd.Categorical([f"type{c}" for c in cond[:, 0].tolist()])},
                       index=[f"c{i}" for i in range(n_cells)])
    start = time.perf_counter()
    latents = sample_latents(model, cond, noise, settings, progress=False)
    reverse_done = time.perf_counter()
    observation = "mean" if settings.observation == "mean" else "counts"
    library_sizes = totals[np.arange(n_cells) % len(totals)] if observation == "counts" else None
    decoder_precision = resolve_decoder_precision(settings, observation, "cpu") if count_draws == "screened" else "fp32"
    with writer_variant(count_draws):
        write_decoded_h5ad(os.path.join(folder, "generated.h5ad"), autoencoder, latents.numpy(), obs, {},
                           progress=False, library_sizes=library_sizes, decoder_precision=decoder_precision)
    end = time.perf_counter()
    if stages is not None:
        stages.append((reverse_done - start, end - reverse_done))
    return end - start


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per row (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="skip the slow 1000-step rows")
    parser.add_argument("--cells", type=int, default=4096, help="cells per run for the fast rows")
    parser.add_argument("--faithful_cells", type=int, default=512, help="cells per run for 1000-step rows")
    parser.add_argument("--solvers", action="store_true",
                        help="only the default and the DPM-Solver++(2M) (ODE and SDE) / DDIM step-count rows (bf16, "
                             "cache 1)")
    parser.add_argument("--draws", action="store_true",
                        help="only the default and DPM-Solver++(2M) logsnr15 rows, each with today's screened count "
                             "draws and with the dense draws before them, and the decoded-mean row")
    parser.add_argument("--decoder", action="store_true",
                        help="only the default and DDPM-50 rows, each with the bf16 output layer (today) and the "
                             "fp32 one, with the reverse / output split")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CellUNet(condition_sizes=(NUM_CLASSES,)).eval()
    log_shares, totals = baron_profile()
    autoencoder = Autoencoder(VAE(NUM_GENES, loss_ae="nb").eval(), [f"g{i}" for i in range(NUM_GENES)], Normalization())
    autoencoder.model.init_output_bias(log_shares)
    with torch.no_grad():  # a decoder whose output varies around the Baron profile, not dominated by random weights
        [m for m in autoencoder.model.decoder if isinstance(m, torch.nn.Linear)][-1].weight.mul_(0.05)
    decoder_mac_count = decoder_macs(autoencoder.model)
    peak = matmul_peak_gflops()
    peak_bf16 = matmul_peak_gflops(dtype=torch.bfloat16)
    # what cell_sample.py does by default with a model trained by the original command line
    # (--branch 0 --cache_interval 5 --non_uniform False)
    default = resolve_settings(DEFAULT_SETTINGS, {"cache_interval": 5, "branch": 0, "non_uniform": False}, "cpu")

    def settings(**changes):
        values = dict(vars(default), sampler=None, use_ddim=None, solver=None)  # the sampler follows the flags given
        values.update(changes)
        return SamplerSettings(**values)

    faithful = dict(use_ddim=False, timestep_respacing="1000", non_uniform=False, branch=0, batch_size=1024,
                    precision="fp32")
    rows = []
    dense_draws = set()  # rows drawing counts the way before (a float32 uniform per entry, whole chunk)
    if args.decoder:
        for label, config in ((f"default ({default.describe()})", default),
                              ("DDPM 50, cache 1, bf16", settings(timestep_respacing="50", cache_interval=1))):
            rows.append((f"{label}, fp32 decoder (before)", replace(config, decoder_precision="fp32"), args.cells,
                         False))
            rows.append((f"{label}, bf16 output layer (today)", config, args.cells, False))
    elif args.draws:
        solver15 = settings(solver="dpmpp2m", timestep_respacing="logsnr15", cache_interval=1)
        for label, config in ((f"default ({default.describe()})", default),
                              ("DPM-Solver++(2M) logsnr15, cache 1, bf16", solver15)):
            rows.append((f"{label}, dense draws (before)", config, args.cells, False))
            dense_draws.add(rows[-1][0])
            rows.append((f"{label}, screened draws + heap reuse (today)", config, args.cells, False))
        rows.append(("default, decoded mean (no count draws)", settings(observation="mean"), args.cells, False))
    elif args.solvers:
        rows.append((f"default ({default.describe()})", default, args.cells, False))
        rows.append(("DDPM 50, cache 1, bf16 (the previous default)", settings(timestep_respacing="50",
                                                                               cache_interval=1), args.cells, False))
        for steps in (10, 15, 20, 25):
            rows.append((f"DPM-Solver++(2M) logsnr{steps}, cache 1, bf16",
                         settings(solver="dpmpp2m", timestep_respacing=f"logsnr{steps}", cache_interval=1),
                         args.cells, False))
        for steps in (10, 15, 20):
            rows.append((f"SDE-DPM-Solver++(2M) logsnr{steps}, cache 1, bf16",
                         settings(solver="dpmpp2m_sde", timestep_respacing=f"logsnr{steps}", cache_interval=1),
                         args.cells, False))
        rows.append(("DDIM 20, cache 1, bf16", settings(use_ddim=True, timestep_respacing="ddim20", cache_interval=1),
                     args.cells, False))
    elif not args.quick:
        rows += [
            ("reference path (per-cell projections), DDPM-1000 cache 5", settings(**faithful, cache_interval=5),
             args.faithful_cells, True),
            ("faithful DDPM-1000, cache 1", settings(**faithful, cache_interval=1), args.faithful_cells, False),
            ("faithful DDPM-1000, cache 5", settings(**faithful, cache_interval=5), args.faithful_cells, False),
            ("DDPM-1000, cache 10", settings(**faithful, cache_interval=10), args.faithful_cells, False),
            ("DDPM-1000, cache 5 non-uniform", settings(**dict(faithful, non_uniform=True), cache_interval=5),
             args.faithful_cells, False),
        ]
    only = args.solvers or args.draws or args.decoder
    for steps in (() if only else (100, 50)):
        for interval in (1, 5):
            rows.append((f"DDIM {steps}, cache {interval}", settings(use_ddim=True, timestep_respacing=f"ddim{steps}",
                                                                     cache_interval=interval, non_uniform=False,
                                                                     batch_size=1024, precision="fp32"),
                         args.cells, False))
    for precision in (() if only else ("fp32", "bf16")):
        for interval in (1, 2, 5):
            rows.append((f"DDPM 50, cache {interval}, {precision}",
                         settings(use_ddim=False, timestep_respacing="50", cache_interval=interval, non_uniform=False,
                                  batch_size=1024, precision=precision), args.cells, False))
    if not only:
        rows.append(("default, decoded mean (no count draws)", settings(observation="mean"), args.cells, False))
        rows.append((f"default ({default.describe()}), dense count draws (before)", default, args.cells, False))
        dense_draws.add(rows[-1][0])
    for batch in (() if only else (256, 1024, 4096)):
        rows.append((f"default ({default.describe()}), batch {batch}", settings(batch_size=batch), args.cells, False))

    print(f"matmul peak ({torch.get_num_threads()} threads, 2048^3): fp32 {peak:.0f} GFLOP/s, "
          f"bf16 {peak_bf16:.0f} GFLOP/s; % peak is against the peak of the row's precision")
    print(f"{'configuration':<78} {'cells/s':>9} {'s/1000 cells':>12} {'useful GFLOP/s':>15} {'% peak':>7} "
          f"{'% fp32 peak':>12}")
    results = []
    timings = {name: [] for name, *_ in rows}
    stages = {name: [] for name, *_ in rows}
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        for _ in range(args.runs):  # interleaved: each round runs every row once, so load hits all rows alike
            for name, config, n_cells, per_cell in rows:
                run_model = PerCellProjections(model) if per_cell else model
                draws = "dense" if name in dense_draws else "screened"
                reuse_freed_memory(draws == "screened")  # as cell_sample.py does now, not before
                timings[name].append(run_once(run_model, autoencoder, config, n_cells, folder, totals, draws,
                                              stages[name]))
    default_rate = None
    for name, config, n_cells, per_cell in rows:
        seconds = statistics.median(timings[name])
        gflops = useful_flops_per_cell(model, config, decoder_mac_count) * n_cells / seconds / 1e9
        cells_per_second = n_cells / seconds
        default_rate = default_rate or (cells_per_second if name.startswith("default") else None)
        results.append((name, cells_per_second))
        row_peak = peak_bf16 if config.precision == "bf16" else peak
        reverse, output = (statistics.median(x[i] for x in stages[name]) for i in (0, 1))
        print(f"{name:<78} {cells_per_second:>9.1f} {1000 / cells_per_second:>12.2f} {gflops:>15.1f} "
              f"{100 * gflops / row_peak:>6.0f}% {100 * gflops / peak:>11.0f}%"
              + (f" {cells_per_second / default_rate:>6.2f}x {'default' if args.solvers else 'row 1'}"
                 if only else "")
              + (f"   reverse {1000 * reverse / n_cells:.2f} + output {1000 * output / n_cells:.2f} s/1000 cells"
                 if args.draws or args.decoder else ""), flush=True)
    by_name = dict(results)
    reference = by_name.get("reference path (per-cell projections), DDPM-1000 cache 5")
    best_default = max(v for k, v in results if k.startswith("default"))
    if reference:
        print(f"default vs the reference-path DDPM-1000 cache 5 (the original's computation): "
              f"{best_default / reference:.1f}x cells/s")
    return results


if __name__ == "__main__":
    main()
