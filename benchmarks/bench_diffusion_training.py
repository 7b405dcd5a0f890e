"""Diffusion training throughput: steps/s of today's path and of each candidate, measured in one run.

    python benchmarks/bench_diffusion_training.py --threads 1                       # steps/s table
    python benchmarks/bench_diffusion_training.py --threads 1 --quality_steps 2000  # + held-out loss curves

The model is the default CellUNet (128 -> 512-512-256-128 and back, the head 512 -> 1024 -> 128), batch 128,
AdamW lr 1e-3 (the demo's settings), on latents of the bundled Baron cells: encoded by ``--vae_path`` when
given, else the top 128 principal components of the cells' log-normalized counts (2,048 most variable genes), each row scaled to unit
length as the autoencoder's latents are (a stand-in with the same shape and labels; the step time does not
depend on the values). Both are scaled to unit variance as ``cell_train.py --latent_scale auto`` does.

Every variant has its own trainer built from the same initial weights; each round runs every variant in turn
(``--steps`` timed steps after two warm-up steps) and the median over ``--runs`` rounds is reported, so
machine load hits all variants alike. Variants:

* ``today``: ``unique(dim=0)`` of the condition rows, the per-block projections gathered by indexing (its
  backward is ``index_put_``), the EMA one tensor at a time (today's code, kept here);
* ``index_select gathers + packed unique + foreach EMA``: the code in ``guided_diffusion`` in fp32: gathers
  by ``index_select`` (backward ``index_add_``), a 1-D unique of packed condition rows
  (:func:`~guided_diffusion.diffusion.denoiser.unique_rows`), the EMA in two foreach kernels;
* ``+ bf16``: ``--precision auto`` on a CPU with AVX512-BF16 / AMX (``torch.autocast`` matmuls, fp32 master
  weights, loss in fp32);
* ``+ bf16 + heap reuse (adopted)``: also :func:`guided_diffusion.core.memory.reuse_freed_memory`, as
  ``DiffusionTrainer.run_loop`` does (no page faults on the step's freshly allocated buffers);
* ``today + bf16``: today's code under the same autocast (what bf16 alone gives);
* ``+ bf16 + heap reuse, one weight cast``: the adopted step, but every Linear's weight and bias reaches the
  forward as a bf16 view of one concatenation cast once per step (:class:`benchmarks.baselines.OneCastTrainer`) instead of
  autocast casting each layer's weights (and its backward casting each gradient back); the same numbers bit for
  bit (measured, not adopted);
* ``bound: adopted forward + backward only``: the adopted step without the optimizer update and the EMA
  (:class:`benchmarks.baselines.ForwardBackwardOnly`; not a training step: the weights never change) — what the network's forward
  and backward alone cost, a bound on any faster optimizer or EMA;
* ``compiled`` (with ``--compile``): ``torch.compile`` of the denoiser's static-shape path, fp32.

Useful GFLOP/s count 2 x multiply-adds of the main-path Linear layers per step (forward, weight gradients,
input gradients except the first layer's; the time / condition embeddings and projections are excluded),
against the fp32 and bf16 2048^3 matmul peaks measured in the same run.

``--quality_steps N`` trains today's path (seeds 0 and 1: the seed-to-seed spread is the noise) the fp32
candidate and the adopted one (seed 0) N steps from the same initial weights on the same batches, timesteps and noise, and prints
the mean denoising loss of the raw weights on a fixed held-out set (held-out cells x fixed timesteps and
noise, evaluated in fp32) every N/4 steps.
"""
import copy
import os
import statistics
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from benchmarks.baselines import ForwardBackwardOnly, OneCastTrainer, TodayTrainer
from benchmarks.bench_sampling import matmul_peak_gflops
from guided_diffusion.diffusion.denoiser import CellUNet
from guided_diffusion.training.pipeline import resolve_latent_scale
from guided_diffusion.cli import ArgumentParser, HelpFormatter, non_negative_int, positive_int
from guided_diffusion.data import load_dataset
from guided_diffusion.core.memory import reuse_freed_memory
from guided_diffusion.diffusion.respace import create_diffusion
from guided_diffusion.cli import add_threads_arg, apply_thread_flags
from guided_diffusion.training.trainer import DiffusionTrainer


def compiled_denoiser(model):
    """(Measured, not adopted.) ``torch.compile`` of the denoiser's static-shape path (every row
    projected, no unique/gather: the gathered path's shapes change with the number of distinct timesteps
    in each batch, which recompiles). Falls back to ``model`` itself, with a warning, where compiling
    fails (no C++ compiler, unsupported platform); compiled and eager outputs agree within rounding."""
    eager = model

    def reference(x, t, cond):
        return eager(x, t, cond, gather_embeddings=False)

    compiled = torch.compile(reference, dynamic=False)
    state = {"fn": None}

    def forward(x, t, cond):
        if state["fn"] is None:
            try:
                out = compiled(x, t, cond)
                state["fn"] = compiled
                return out
            except Exception as error:  # inductor needs a working C++ toolchain
                warnings.warn(f"torch.compile unavailable ({type(error).__name__}); training eagerly")
                state["fn"] = eager
        return state["fn"](x, t, cond)
    return forward


# ---- data ------------------------------------------------------------------------------------------
def baron_latents(vae_path=None, latent_dim=128):
    """(latents scaled to unit variance, label codes (N, 1), num_classes) of the bundled Baron cells."""
    dataset = load_dataset(os.path.join(ROOT, "dataset", "baron_human.h5ad"))
    try:
        if vae_path:
            from VAE.VAE_model import load_autoencoder

            autoencoder, _ = load_autoencoder(vae_path)
            latents = autoencoder.encode_dataset(dataset, progress=False)
        else:
            chunks = [np.arange(start, min(start + 1024, dataset.n_cells)) for start in range(0, dataset.n_cells, 1024)]
            sums = sum(dataset.rows(c).astype(np.float64).sum(0) for c in chunks)
            squares = sum((dataset.rows(c).astype(np.float64) ** 2).sum(0) for c in chunks)
            variance = squares / dataset.n_cells - (sums / dataset.n_cells) ** 2
            genes = np.sort(np.argsort(variance)[-2048:])  # the 2,048 most variable genes
            x = torch.from_numpy(np.concatenate([dataset.rows(c)[:, genes] for c in chunks]))
            torch.manual_seed(0)
            _, _, v = torch.pca_lowrank(x, q=latent_dim, center=True, niter=4)
            latents = torch.nn.functional.normalize((x - x.mean(0)) @ v, dim=1).numpy()
        labels, num_classes = dataset.label_codes, dataset.num_classes
    finally:
        dataset.close()
    latents = latents * resolve_latent_scale("auto", latents)
    return latents.astype(np.float32), np.asarray(labels), num_classes


def split_cells(n_cells, heldout, seed=0):
    order = np.random.default_rng(seed).permutation(n_cells)
    return np.sort(order[heldout:]), np.sort(order[:heldout])


# ---- variants --------------------------------------------------------------------------------------
VARIANTS = {
    # name: (trainer class, heap reuse, precision, compile)
    "today": (TodayTrainer, False, "fp32", False),
    "index_select gathers + packed unique + foreach EMA": (DiffusionTrainer, False, "fp32", False),
    "+ bf16": (DiffusionTrainer, False, "bf16", False),
    "+ bf16 + heap reuse (adopted)": (DiffusionTrainer, True, "bf16", False),
    "today + bf16": (TodayTrainer, False, "bf16", False),
    "+ bf16 + heap reuse, one weight cast": (OneCastTrainer, True, "bf16", False),
    "bound: adopted forward + backward only": (ForwardBackwardOnly, True, "bf16", False),
    "compiled (fp32, static shapes)": (DiffusionTrainer, False, "fp32", True),
}
ADOPTED = "+ bf16 + heap reuse (adopted)"


def make_trainer(variant, initial, latents, labels, args, seed=0):
    trainer_class, _, precision, compiled = VARIANTS[variant]
    model = copy.deepcopy(initial)
    trainer = trainer_class(model, create_diffusion(1000), latents, labels, {}, tempfile.mkdtemp(prefix="bench_dt_"),
                         batch_size=args.batch_size, lr=args.lr, weight_decay=1e-4, ema_rate=0.9999,
                         lr_anneal_steps=0, seed=seed, precision=precision)
    if compiled:
        trainer.replica = compiled_denoiser(trainer.replica)
    return trainer


def timed_steps(trainer, variant, steps):
    reuse_freed_memory(VARIANTS[variant][1])
    try:
        for _ in range(2):
            trainer.run_step()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            trainer.run_step()
        return steps / (time.perf_counter() - start), steps / (time.process_time() - cpu_start)
    finally:
        reuse_freed_memory(False)


def useful_gflop_per_step(model, batch_size):
    first = model.encoder[0].linear
    macs = model.macs_per_sample()
    return 2 * batch_size * (3 * macs - first.in_features * first.out_features) / 1e9


@torch.no_grad()
def heldout_loss(model, diffusion, latents, labels, repeats=4, seed=1234):
    """Mean denoising MSE of ``model`` on ``latents`` x ``repeats`` fixed (timestep, noise) draws, in fp32."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(latents).repeat(repeats, 1)
    cond = torch.as_tensor(labels, dtype=torch.long).repeat(repeats, 1)
    t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    was_training = model.training
    model.eval()
    losses = torch.cat([diffusion.training_losses(model, x0[i:i + 2048], t[i:i + 2048],
                                                  model_kwargs={"cond": cond[i:i + 2048]}, noise=noise[i:i + 2048])
                        for i in range(0, len(x0), 2048)])
    model.train(was_training)
    return float(losses.mean())


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--runs", type=positive_int, default=5, help="rounds over all variants (median)")
    parser.add_argument("--steps", type=positive_int, default=40, help="timed steps per variant per round")
    parser.add_argument("--batch_size", type=positive_int, default=128, help="cells per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--vae_path", default="", help="autoencoder to encode Baron with (default: PCA stand-in)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile variant")
    parser.add_argument("--quality_steps", type=non_negative_int, default=0,
                        help="train today's and the adopted path this many steps and compare held-out losses")
    parser.add_argument("--heldout", type=positive_int, default=400, help="held-out cells for the loss")
    add_threads_arg(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_thread_flags(args)
    threads = torch.get_num_threads()
    latents, labels, num_classes = baron_latents(args.vae_path or None)
    train_index, heldout_index = split_cells(len(latents), args.heldout)
    torch.manual_seed(0)
    initial = CellUNet(latent_dim=latents.shape[1], condition_sizes=num_classes)
    source = "autoencoder latents" if args.vae_path else "PCA stand-in latents"
    print(f"Baron {len(train_index)} training / {len(heldout_index)} held-out cells, {source}, "
          f"{threads} thread(s), batch {args.batch_size}, lr {args.lr}")

    names = [name for name in VARIANTS if args.compile or not VARIANTS[name][3]]
    trainers = {name: make_trainer(name, initial, latents[train_index], labels[train_index], args) for name in names}
    if args.compile:
        start = time.perf_counter()
        trainers["compiled (fp32, static shapes)"].run_step()
        print(f"torch.compile: first step (compiling) {time.perf_counter() - start:.1f} s")
    fp32_peak = matmul_peak_gflops()
    bf16_peak = matmul_peak_gflops(dtype=torch.bfloat16)
    rates = {name: [] for name in names}
    for _ in range(args.runs):
        for name in names:
            rates[name].append(timed_steps(trainers[name], name, args.steps))
    gflop = useful_gflop_per_step(initial, args.batch_size)
    print(f"matmul peaks (2048^3, {threads} thread(s)): fp32 {fp32_peak:.0f} GFLOP/s, bf16 {bf16_peak:.0f} GFLOP/s; "
          f"useful work {gflop:.3f} GFLOP per step")
    print(f"median of {args.runs} rounds x {args.steps} steps, interleaved")
    print("(steps per CPU-second: the process's own CPU time, less sensitive to other jobs on a shared machine)")
    print("| variant | steps/s | vs today | steps per CPU-s | vs today | useful GFLOP/s | % of fp32 peak | "
          "% of bf16 peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    today = statistics.median(wall for wall, _ in rates["today"])
    today_cpu = statistics.median(cpu for _, cpu in rates["today"])
    for name in names:
        rate = statistics.median(wall for wall, _ in rates[name])
        cpu = statistics.median(cpu for _, cpu in rates[name])
        print(f"| {name} | {rate:.1f} | {rate / today:.2f}x | {cpu:.1f} | {cpu / today_cpu:.2f}x | {rate * gflop:.1f} | "
              f"{100 * rate * gflop / fp32_peak:.0f}% | {100 * rate * gflop / bf16_peak:.1f}% |")

    if args.quality_steps:
        quality(args, initial, latents, labels, train_index, heldout_index)


def quality(args, initial, latents, labels, train_index, heldout_index):
    diffusion = create_diffusion(1000)
    # heap reuse does not change the numbers (the same operations), so it is not trained separately
    runs = [("today", 0), ("today", 1), ("index_select gathers + packed unique + foreach EMA", 0), (ADOPTED, 0)]
    if args.compile:
        runs.append(("compiled (fp32, static shapes)", 0))
    checkpoints = sorted({max(1, args.quality_steps * k // 4) for k in range(1, 5)})
    print(f"\nheld-out denoising loss (raw weights, fp32, {len(heldout_index)} cells x 4 fixed (t, noise)), "
          f"steps {checkpoints}")
    print("| variant | seed | " + " | ".join(f"step {s}" for s in checkpoints) + " | train s |")
    print("| --- | ---: |" + " ---: |" * (len(checkpoints) + 1))
    for name, seed in runs:
        trainer = make_trainer(name, initial, latents[train_index], labels[train_index], args, seed=seed)
        reuse_freed_memory(VARIANTS[name][1])
        values, seconds = [], 0.0
        try:
            for target in checkpoints:
                start = time.perf_counter()
                while trainer.step < target:
                    trainer.run_step()
                seconds += time.perf_counter() - start
                values.append(heldout_loss(trainer.model, diffusion, latents[heldout_index], labels[heldout_index]))
        finally:
            reuse_freed_memory(False)
        print(f"| {name} | {seed} | " + " | ".join(f"{v:.5f}" for v in values) + f" | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
