"""Sampling at scale: where a large cell_sample.py run spends its time, peak memory and bytes on disk.

    python benchmarks/bench_scale.py --cells 10000 --threads 2
    python benchmarks/bench_scale.py --cells 100000 --runs 1 --layouts dense default
    python benchmarks/bench_scale.py --profile --threads 1     # sub-steps of one 1,024-cell chunk, both draws
    python benchmarks/bench_scale.py --block_rows 128 512 1024 --threads 2   # screened draws per block size

Stages, as cell_sample.py runs them with its default settings (DDPM 50, cache 1, guidance, count
draws): start-up (importing cell_sample in a fresh interpreter), reverse diffusion (a randomly
initialised default-size CellUNet: the cost does not depend on the weights), then, per output layout,
in a fresh process: decoding + negative-binomial count draws (the count decoder of bench_sampling.py,
biased to the Baron cells' gene shares so that the draws have realistic non-zeros), log-normalization,
the h5ad writes (measured on the writer thread, overlapped with the decoding except for `previous`),
the final fsync + rename, the per-condition latent .npy files and the manifest. Layouts:

| layout    | what                                                                           |
| --------- | ------------------------------------------------------------------------------ |
| previous  | the writer two sessions ago: X's indices/indptr stored twice, writes inline    |
| dense     | the path before this session: as default, with the dense count draws           |
| default   | shared sparsity pattern, background writes, screened count draws               |
| heap      | the default with freed memory kept for reuse: what cell_sample.py runs          |

(dense draws: a float32 uniform per entry over the whole 1,024 x 20,125 chunk; screened: blocks of 128
cells, a random byte per entry, the inverse CDF on the candidates only; heap reuse:
guided_diffusion/core/memory.py.)
| lzf, gzip | the default with that compression of the matrices (--compression)               |

Reverse diffusion runs on ``--reverse_cells`` (default: all) and its rate is scaled to --cells when
fewer; the output stages always handle every cell. Each layout's peak RSS is that of its own process.
Every file is checked to hold the same cells as the first layout's when it draws from the same random
numbers (the dense and screened draws use different ones: for them the non-zero share and the mean count
per cell are compared instead). ``--profile`` times the sub-steps of one chunk for both draws, in one
process, interleaved (medians; the screened draws with heap reuse, as cell_sample.py runs them).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import pandas as pd
import torch

NUM_GENES = 20125
NUM_CLASSES = 14
LAYOUTS = {"previous": dict(compression="none", background_writes=False, share_pattern=False, count_draws="dense"),
           "dense": dict(compression="none", count_draws="dense"), "default": dict(compression="none"),
           "heap": dict(compression="none", heap_reuse=True),
           "lzf": dict(compression="lzf"), "gzip": dict(compression="gzip")}


def count_autoencoder():
    from benchmarks.bench_sampling import baron_profile
    from guided_diffusion.data import Normalization
    from VAE.VAE_model import VAE, Autoencoder

    torch.manual_seed(0)
    log_shares, totals = baron_profile()
    autoencoder = Autoencoder(VAE(NUM_GENES, loss_ae="nb").eval(), [f"g{i}" for i in range(NUM_GENES)], Normalization())
    autoencoder.model.init_output_bias(log_shares)
    with torch.no_grad():
        [m for m in autoencoder.model.decoder if isinstance(m, torch.nn.Linear)][-1].weight.mul_(0.05)
    return autoencoder, totals


def plan_for(n_cells):
    counts = [n_cells // NUM_CLASSES + (c < n_cells % NUM_CLASSES) for c in range(NUM_CLASSES)]
    return [((c,), n) for c, n in enumerate(counts) if n]


def reverse_diffusion(n_cells, reverse_cells):
    """Latents for n_cells (the first reverse_cells sampled, the rest tiled from them) and the seconds
    the reverse process would take for all n_cells."""
    from guided_diffusion.diffusion.denoiser import CellUNet
    from guided_diffusion.sampling.settings import DEFAULT_SETTINGS, resolve_settings
    from guided_diffusion.sampling.reverse import sample_latents

    torch.manual_seed(0)
    model = CellUNet(condition_sizes=(NUM_CLASSES,)).eval()
    settings = resolve_settings(DEFAULT_SETTINGS, {"cache_interval": 5, "branch": 0, "non_uniform": False}, "cpu")
    rows = np.concatenate([np.full(count, row[0]) for row, count in plan_for(n_cells)])[:reverse_cells]
    noise = torch.randn(len(rows), model.latent_dim, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    latents = sample_latents(model, torch.as_tensor(rows)[:, None], noise, settings, progress=False).numpy()
    seconds = (time.perf_counter() - start) * n_cells / len(rows)
    return np.resize(latents, (n_cells, latents.shape[1])), seconds


def write_outputs(latent_path, folder, layout):
    """One layout's output stages (run in a fresh process); prints a JSON line of its figures."""
    from benchmarks.baselines import writer_variant
    from guided_diffusion.sampling.pipeline import GENERATED, write_latent_files, write_manifest
    from guided_diffusion.sampling.writer import write_decoded_h5ad

    latents = np.load(latent_path)
    autoencoder, totals = count_autoencoder()
    n_cells = len(latents)
    plan = plan_for(n_cells)
    settings = SimpleNamespace(non_uniform=False, cache_interval=1)  # what the latent file names need
    obs = pd.DataFrame({"cell_type1": pd.Categorical(np.concatenate([[f"type{r[0]}"] * n for r, n in plan]))},
                       index=pd.Index([f"generated_{i}" for i in range(n_cells)], name="cell"))
    library_sizes = totals[np.arange(n_cells) % len(totals)].astype(np.float32)
    options = dict(LAYOUTS[layout])
    if options.pop("heap_reuse", False):
        from guided_diffusion.core.memory import reuse_freed_memory
        reuse_freed_memory()
    timings = {}
    variant = dict(count_draws=options.pop("count_draws", "screened"), share_pattern=options.pop("share_pattern", True))
    start = time.perf_counter()
    with torch.inference_mode(), writer_variant(timings=timings, **variant):
        write_decoded_h5ad(os.path.join(folder, GENERATED), autoencoder, latents, obs, {"cfdiffusion": {}},
                           progress=False, library_sizes=library_sizes, **options)
    stage = time.perf_counter()
    files = write_latent_files(folder, plan, [NUM_CLASSES], settings, latents)
    write_manifest(folder, [GENERATED] + files, {})
    timings["latent files and manifest"] = time.perf_counter() - stage
    timings["output total"] = time.perf_counter() - start
    sizes = {"h5ad": os.path.getsize(os.path.join(folder, GENERATED)),
             "latents": sum(os.path.getsize(os.path.join(folder, name)) for name in files)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import h5py
    with h5py.File(os.path.join(folder, GENERATED)) as store:
        nnz, total = store["layers/counts/data"].shape[0], 0.0
        for begin in range(0, nnz, 1 << 24):
            total += float(store["layers/counts/data"][begin:begin + (1 << 24)].sum(dtype=np.float64))
    draws = {"nonzero_share": nnz / (n_cells * NUM_GENES), "mean_count": total / n_cells}
    print(json.dumps({"timings": timings, "sizes": sizes, "peak_rss": peak, "draws": draws}))


def _dense_chunk(model, latent, totals, generator, clock):
    """The dense count draws of one chunk, step by step (baselines.sample_counts_dense in parts)."""
    from VAE.count_model import _csr, _heavy_threshold, _inverse_cdf_draws

    with clock("decoder hidden layers"):
        hidden = model.decoder[:-1](latent)
    with clock("decoder output layer"):
        logits = model.decoder[-1](hidden)
    with clock("softmax"):
        shares = torch.softmax(logits, dim=1)
    with clock("mean = shares x library size"):
        mean = shares * totals[:, None]
    theta = torch.exp(model.log_theta.float())
    with clock("uniform draws (float32, every entry)"):
        v = torch.rand(mean.shape, generator=generator)
    with clock("screen (v < mean) + nonzero"):
        heavy_threshold = _heavy_threshold(theta)
        mask = v < mean
        if heavy_threshold.min() < 1:
            mask |= mean > heavy_threshold
        candidates = torch.nonzero(mask.view(-1)).squeeze(1)
    with clock("inverse CDF / Gamma-Poisson"):
        draws = _inverse_cdf_draws(mean.view(-1).index_select(0, candidates),
                                   1.0 - v.view(-1).index_select(0, candidates).double(), theta,
                                   candidates % mean.shape[1], heavy_threshold, generator)
    with clock("CSR"):
        nonzero = torch.nonzero(draws).squeeze(1)
        return _csr(candidates[nonzero], draws[nonzero], *mean.shape)


def chunk_inputs(n_cells):
    """The count autoencoder, one chunk's unit-norm latents and their library sizes (fixed seeds)."""
    autoencoder, totals = count_autoencoder()
    latent = torch.nn.functional.normalize(torch.randn(n_cells, autoencoder.model.latent_dim,
                                                       generator=torch.Generator().manual_seed(1)), dim=1)
    library = torch.as_tensor(totals[np.arange(n_cells) % len(totals)].astype(np.float32))
    return autoencoder, latent, library


def profile_chunk(threads, runs, n_cells=1024):
    """Seconds per sub-step of one chunk's output stages, interleaved: the dense draws, the screened draws with
    the float32 output layer, and the screened draws with the bf16 output layer (cell_sample.py's default where
    the CPU has native bf16)."""
    import scipy.sparse as sp

    from benchmarks.baselines import SubStepClock, timed_sample_counts
    from guided_diffusion.sampling.writer import log_normalize_counts
    from guided_diffusion.core.memory import reuse_freed_memory

    autoencoder, latent, library = chunk_inputs(n_cells)
    model = autoencoder.model
    rounds = {"dense": [], "screened": [], "screened bf16": []}
    with torch.inference_mode():
        for run in range(runs + 1):  # the first round warms up and is not counted
            for method in rounds:
                steps = {}
                start = time.perf_counter()
                generator = torch.Generator().manual_seed(run)
                reuse_freed_memory(method == "screened")  # as cell_sample.py runs it now, not before
                if method == "dense":
                    counts = _dense_chunk(model, latent, library, generator, SubStepClock(steps))
                else:
                    counts = timed_sample_counts(model, latent, library, generator, steps,
                                                 "bf16" if method.endswith("bf16") else "fp32")
                with SubStepClock(steps)("CSR"):
                    counts = sp.csr_matrix((counts.values().numpy(), counts.col_indices().numpy().astype(np.int32),
                                            counts.crow_indices().numpy()), shape=tuple(counts.shape))
                clock = SubStepClock(steps)
                with clock("log1p(normalize_total)"):
                    log_normalize_counts(counts, 1e4)
                steps["total"] = time.perf_counter() - start
                if run:
                    rounds[method].append(steps)
    order = ["decoder hidden layers", "decoder output layer", "softmax", "mean = shares x library size",
             "uniform draws (float32, every entry)", "random bytes", "screen (v < mean) + nonzero",
             "softmax x library size + screen", "inverse CDF / Gamma-Poisson", "CSR",
             "log1p(normalize_total)", "total"]
    found = {name for method in rounds for name in rounds[method][0]}
    names = [name for name in order if name in found] + sorted(found - set(order))
    print(f"one chunk of {n_cells} cells x {NUM_GENES} genes, {threads} threads, medians of {runs} interleaved "
          f"rounds (ms); candidates/non-zeros as drawn")
    print(f"{'sub-step':<40}{'dense':>10}{'screened':>10}{'+ bf16 out':>11}")
    medians = {method: {name: statistics.median(r.get(name, 0.0) for r in rounds[method]) for name in names}
               for method in rounds}
    for name in names:
        print(f"{name:<40}" + "".join(f"{1000 * medians[m].get(name, 0.0):>10.1f}" for m in rounds))
    print(f"{'dense / screened time':<40}{medians['dense']['total'] / medians['screened']['total']:>20.2f}x")
    print(f"{'screened / screened bf16 time':<40}"
          f"{medians['screened']['total'] / medians['screened bf16']['total']:>31.2f}x")
    return medians


def time_block_sizes(threads, runs, sizes, n_cells=1024):
    """Seconds for one chunk's output layer + screened draws at each ``block_rows``, interleaved rounds
    (heap reuse on, as cell_sample.py runs it); the draws are the same for every size (checked)."""
    from guided_diffusion.core.memory import reuse_freed_memory
    from VAE.count_model import sample_negative_binomial_screened

    reuse_freed_memory(True)
    autoencoder, latent, library = chunk_inputs(n_cells)
    model = autoencoder.model
    theta = torch.exp(model.log_theta.float())
    seconds = {size: [] for size in sizes}
    with torch.inference_mode():
        hidden, output = model.decoder[:-1](latent), model.decoder[-1]
        for run in range(runs + 1):  # the first round warms up and is not counted
            drawn = []
            for size in sizes:
                start = time.perf_counter()
                counts = sample_negative_binomial_screened(
                    lambda a, b: torch.nn.functional.linear(hidden[a:b], output.weight, output.bias), library,
                    theta, torch.Generator().manual_seed(run), block_rows=size)
                if run:
                    seconds[size].append(time.perf_counter() - start)
                drawn.append(counts.values())
            if not all(torch.equal(drawn[0], other) for other in drawn[1:]):
                raise AssertionError("the draws depend on block_rows")
    reference = statistics.median(seconds[sizes[0]])
    print(f"one chunk of {n_cells} cells x {NUM_GENES} genes (output layer + screened draws), {threads} threads, "
          f"medians of {runs} interleaved rounds; identical draws at every size")
    for size in sizes:
        median = statistics.median(seconds[size])
        print(f"block_rows {size:>5}: {1000 * median:8.0f} ms   {reference / median:5.2f}x block_rows {sizes[0]}")
    return seconds


def same_cells(reference, other, block=1 << 24):
    """Whether two generated files hold the same matrices (values, indices, indptr) and obs, read in blocks."""
    import anndata as ad
    import h5py

    with h5py.File(reference) as a, h5py.File(other) as b:
        for name in ("X/data", "X/indices", "X/indptr", "layers/counts/data", "layers/counts/indices"):
            if a[name].shape != b[name].shape:
                return False
            for start in range(0, a[name].shape[0], block):
                if not np.array_equal(a[name][start:start + block], b[name][start:start + block]):
                    return False
    return ad.read_h5ad(reference, backed="r").obs.equals(ad.read_h5ad(other, backed="r").obs)


def startup_seconds():
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cell_sample"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def run_layout(latent_path, folder, layout, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_write", latent_path, folder, layout,
                          "--threads", str(threads)], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=10000, help="cells generated")
    parser.add_argument("--reverse_cells", type=int, default=None, help="cells run through reverse diffusion "
                        "(default: all; fewer: the rate is scaled to --cells)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pinned)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs per layout (medians reported)")
    parser.add_argument("--layouts", nargs="+", default=["dense", "default", "heap"], choices=list(LAYOUTS))
    parser.add_argument("--profile", action="store_true", help="only the sub-steps of one 1,024-cell chunk, "
                        "dense vs screened draws (--runs interleaved rounds)")
    parser.add_argument("--block_rows", type=int, nargs="+", default=None,
                        help="only time one chunk's screened draws at these block sizes (--runs interleaved rounds)")
    parser.add_argument("--_write", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._write:
        return write_outputs(*args._write)
    if args.profile:
        return profile_chunk(args.threads, args.runs)
    if args.block_rows:
        return time_block_sizes(args.threads, args.runs, args.block_rows)
    startup = statistics.median(startup_seconds() for _ in range(args.runs))
    latents, reverse = reverse_diffusion(args.cells, min(args.reverse_cells or args.cells, args.cells))
    results = {layout: [] for layout in args.layouts}
    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "checkpoint")) as work:
        latent_path = os.path.join(work, "latents.npy")
        np.save(latent_path, latents)
        for run in range(args.runs):
            for layout in args.layouts:
                folder = os.path.join(work, layout)
                results[layout].append(run_layout(latent_path, folder, layout, args.threads))
        draws_of = lambda layout: LAYOUTS[layout].get("count_draws", "screened")  # noqa: E731
        identical = {layout: same_cells(os.path.join(work, args.layouts[0], "generated.h5ad"),
                                        os.path.join(work, layout, "generated.h5ad"))
                     if draws_of(layout) == draws_of(args.layouts[0]) else "other draws"
                     for layout in args.layouts[1:]}
    report(args, startup, reverse, results, identical)
    return results


def report(args, startup, reverse, results, identical):
    print(f"{args.cells} cells, {args.threads} threads, medians of {args.runs} interleaved runs; start-up "
          f"{startup:.1f} s, reverse diffusion {reverse:.1f} s ({args.cells / reverse:.0f} cells/s"
          f"{', scaled from ' + str(args.reverse_cells) + ' cells' if args.reverse_cells else ''})")
    stages = sorted({stage for runs in results.values() for run in runs for stage in run["timings"]})
    print(f"{'stage (s)':<28}" + "".join(f"{layout:>12}" for layout in results))
    median = {layout: {stage: statistics.median(run["timings"].get(stage, 0.0) for run in runs) for stage in stages}
              for layout, runs in results.items()}
    for stage in stages:
        print(f"{stage:<28}" + "".join(f"{median[layout][stage]:>12.2f}" for layout in results))
    first = args.layouts[0]
    rows = {
        "whole process, cells/s": lambda m, r: f"{args.cells / (startup + reverse + m['output total']):.0f}",
        "output stages, cells/s": lambda m, r: f"{args.cells / m['output total']:.0f}",
        f"output time vs {first}": lambda m, r: f"{m['output total'] / median[first]['output total']:.2f}",
        "peak RSS, MB": lambda m, r: f"{max(x['peak_rss'] for x in r) / 1e6:.0f}",
        "h5ad bytes per cell": lambda m, r: f"{r[0]['sizes']['h5ad'] / args.cells:.0f}",
        "latent bytes per cell": lambda m, r: f"{r[0]['sizes']['latents'] / args.cells:.0f}",
        "non-zero share of counts": lambda m, r: f"{r[0]['draws']['nonzero_share']:.4f}",
        "mean count per cell": lambda m, r: f"{r[0]['draws']['mean_count']:.0f}",
        f"same cells as {first}": lambda m, r: "-",
    }
    for name, cell in rows.items():
        values = [cell(median[layout], runs) for layout, runs in results.items()]
        if name.startswith("same cells"):
            values = ["-"] + [str(identical[layout]) for layout in args.layouts[1:]]
        print(f"{name:<28}" + "".join(f"{value:>12}" for value in values))


if __name__ == "__main__":
    main()
