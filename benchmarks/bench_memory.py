"""Peak memory of training on growing h5ad files: streaming (--backed True) against in-memory loading.

For every size it writes a synthetic, labelled sparse-count h5ad (chunk by chunk, so the generator
never holds the matrix either), then runs in a fresh subprocess each

* the autoencoder (VAE/VAE_train.py, a few dozen steps, then its held-out evaluation), and
* the diffusion trainer (cell_train.py: one streaming pass for size factors, encoding every cell to
  latents, a few dozen steps),

and reads the subprocess's peak resident memory from ``os.wait4``. It also times the streaming
loader in this process (block-shuffled batches, densified and normalized: cells/s) and prints one
table beside the dense footprint N x G x 4 bytes. Not part of the test suite:

    python benchmarks/bench_memory.py                      # 20k and 200k cells x 5000 genes
    python benchmarks/bench_memory.py --sizes 20000 200000 1000000 --modes backed memory
    python benchmarks/bench_memory.py --trainers diffusion --modes backed --nproc 2   # per process, torchrun

With ``--nproc N`` the diffusion trainer runs under ``torchrun --nproc_per_node N``; the peak read from
``os.wait4`` is then the largest of torchrun's and its workers' (the peak of one process, not their sum).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

REPO_ROOT = Path(__file__).resolve().parents[1]

from guided_diffusion.cli import ArgumentParser, HelpFormatter
from guided_diffusion.data import DEFAULT_BLOCK_ROWS, BlockShuffledSampler, load_dataset

N_TYPES = 10
LATENT_DIM = 128
WRITE_CHUNK_ROWS = 2000


def write_synthetic_h5ad(path, n_cells, n_genes, density, seed=0):
    """Sparse counts (CSR, float32) with a ``cell_type1`` label; each type expresses its own genes more often."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, N_TYPES, size=n_cells)
    gene_factor = rng.gamma(2.0, 0.5, size=n_genes)
    detection = np.tile(gene_factor, (N_TYPES, 1))
    block = n_genes // N_TYPES
    for t in range(N_TYPES):
        detection[t, t * block:(t + 1) * block] *= 3.0
    detection *= density / detection.mean(axis=1, keepdims=True)
    detection = np.clip(detection, 0.0, 0.95)
    temp_path = path.with_suffix(".partial")
    with h5py.File(temp_path, "w") as store:
        store.attrs["encoding-type"] = "anndata"
        store.attrs["encoding-version"] = "0.1.0"
        for start in range(0, n_cells, WRITE_CHUNK_ROWS):
            chunk_types = types[start:start + WRITE_CHUNK_ROWS]
            chunk_rng = np.random.default_rng([seed, start])
            expressed = chunk_rng.random((len(chunk_types), n_genes), dtype=np.float32) < detection[chunk_types]
            rows, cols = np.nonzero(expressed)
            values = (1 + chunk_rng.geometric(0.4, size=len(rows))).astype(np.float32)
            chunk = sp.csr_matrix((values, (rows, cols)), shape=expressed.shape, dtype=np.float32)
            if start == 0:
                # anndata makes the arrays resizable for append; 1 MiB chunks keep row-block reads cheap
                write_elem(store, "X", chunk, dataset_kwargs={"chunks": (1 << 18,)})
                matrix = sparse_dataset(store["X"])
            else:
                matrix.append(chunk)
        obs = pd.DataFrame({"cell_type1": pd.Categorical([f"type_{t}" for t in types])},
                           index=pd.Index([f"cell{i}" for i in range(n_cells)]))
        write_elem(store, "obs", obs)
        write_elem(store, "var", pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_genes)])))
        for empty in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(store, empty, {})
    os.replace(temp_path, path)


def run_measured(command):
    """Run ``command``; return (peak RSS in MiB, wall seconds). Raises with its output if it fails."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({process.returncode}):\n{output}")
    return usage.ru_maxrss / 1024.0, seconds


def loader_throughput(path, batch_size, n_batches):
    """Cells/s of the one-pass scan (validation + size factors) and of block-shuffled training batches."""
    started = time.monotonic()
    dataset = load_dataset(str(path), label_keys=[], require_labels=False, backed=True)
    scan_seconds = time.monotonic() - started
    sampler = BlockShuffledSampler(np.arange(dataset.n_cells), batch_size, seed=0, block_rows=dataset.block_rows)
    started = time.monotonic()
    for _ in range(n_batches):
        dataset.rows(sampler.next_batch())
    batch_seconds = time.monotonic() - started
    n_cells = dataset.n_cells
    dataset.close()
    return n_cells / scan_seconds, n_batches * batch_size / batch_seconds


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000], help="cells per file")
    parser.add_argument("--genes", type=int, default=5000)
    parser.add_argument("--density", type=float, default=0.05, help="fraction of non-zero entries")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each model")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--hidden_dims", type=int, nargs="+", default=[256, 256, 256],
                        help="autoencoder widths (memory of the model does not depend on the number of cells)")
    parser.add_argument("--modes", nargs="+", default=["backed", "memory"], choices=["backed", "memory"],
                        help="--backed True and/or --backed False")
    parser.add_argument("--trainers", nargs="+", default=["autoencoder", "diffusion"],
                        choices=["autoencoder", "diffusion"],
                        help="which trainers are measured (the diffusion trainer needs an autoencoder: trained "
                             "unmeasured when only the diffusion trainer is measured, or reused from --workdir)")
    parser.add_argument("--nproc", type=int, default=1, help="processes of the diffusion trainer (torchrun when > 1)")
    parser.add_argument("--diffusion_flags", nargs="*", default=[],
                        help="more flags for cell_train.py (e.g. --latents_on_disk False)")
    parser.add_argument("--loader_batches", type=int, default=400, help="batches timed for the loader throughput")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cfdiffusion_bench_memory"),
                        help="where the h5ad files and checkpoints go (files are reused when present; "
                             "1M cells x 5000 genes take 2 GiB)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n_cells in args.sizes:
        path = workdir / f"synthetic_{n_cells}x{args.genes}.h5ad"
        if not path.exists():
            started = time.monotonic()
            write_synthetic_h5ad(path, n_cells, args.genes, args.density)
            print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.0f} MiB, {time.monotonic() - started:.0f} s)",
                  flush=True)
        with h5py.File(path, "r") as store:
            nnz = int(store["X"]["data"].shape[0])
        scan_rate, batch_rate = loader_throughput(path, args.batch_size, args.loader_batches)
        for mode in args.modes:
            backed = "True" if mode == "backed" else "False"
            ae_dir = workdir / f"ae_{n_cells}_{mode}"
            ae_command = [sys.executable, "VAE/VAE_train.py", "--data_dir", path, "--save_dir", ae_dir,
                          "--max_steps", args.steps, "--checkpoint_freq", args.steps, "--batch_size",
                          args.batch_size, "--hidden_dims", *args.hidden_dims, "--backed", backed,
                          "--progress", "False"]
            vae = ae_dir / f"model_seed=0_step={args.steps}.pt"
            ae_rss, ae_seconds = float("nan"), float("nan")
            if "autoencoder" in args.trainers or not vae.exists():
                ae_rss, ae_seconds = run_measured(list(map(str, ae_command + ["--overwrite", "True"])))
                if "autoencoder" not in args.trainers:
                    ae_rss, ae_seconds = float("nan"), float("nan")
            if "diffusion" not in args.trainers:
                rows.append({"cells": n_cells, "genes": args.genes, "nnz": nnz, "mode": mode,
                             "file_mib": path.stat().st_size / 2 ** 20, "ae_peak_mib": ae_rss, "ae_s": ae_seconds,
                             "scan_cells_per_s": scan_rate, "batch_cells_per_s": batch_rate})
                print(f"{n_cells} cells, {mode}: autoencoder {ae_rss:.0f} MiB ({ae_seconds:.0f} s)", flush=True)
                continue
            launcher = [sys.executable] if args.nproc == 1 else [
                str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.nproc)]
            run_name = f"{n_cells}_{mode}_{args.nproc}"
            shutil.rmtree(workdir / "diffusion" / run_name, ignore_errors=True)  # encoded afresh each time
            diffusion_command = [*launcher, "cell_train.py", "--data_dir", path, "--vae_path", vae,
                                 "--save_dir", workdir / "diffusion", "--model_name", run_name,
                                 "--lr_anneal_steps", args.steps, "--save_interval", args.steps,
                                 "--batch_size", args.batch_size, "--backed", backed, "--progress", "False",
                                 "--overwrite", "True", *args.diffusion_flags]
            diffusion_rss, diffusion_seconds = run_measured(list(map(str, diffusion_command)))
            rows.append({"cells": n_cells, "genes": args.genes, "nnz": nnz, "mode": mode, "nproc": args.nproc,
                         "file_mib": path.stat().st_size / 2 ** 20,
                         "dense_gib": n_cells * args.genes * 4 / 2 ** 30,
                         "latents_mib": n_cells * LATENT_DIM * 4 / 2 ** 20,
                         "ae_peak_mib": ae_rss, "ae_s": ae_seconds,
                         "diffusion_peak_mib": diffusion_rss, "diffusion_s": diffusion_seconds,
                         "scan_cells_per_s": scan_rate, "batch_cells_per_s": batch_rate})
            print(f"{n_cells} cells, {mode}: autoencoder {ae_rss:.0f} MiB ({ae_seconds:.0f} s), "
                  f"diffusion {diffusion_rss:.0f} MiB ({diffusion_seconds:.0f} s)", flush=True)

    table = pd.DataFrame(rows)
    print()
    print(f"{args.genes} genes, density {args.density}, {args.steps} steps per model, batch {args.batch_size}, "
          f"autoencoder {'x'.join(map(str, args.hidden_dims))}, block_rows {DEFAULT_BLOCK_ROWS}; "
          f"peak RSS of each training subprocess (MiB; with --nproc > 1: of its largest process)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    for mode in args.modes:
        sized = table[table["mode"] == mode].sort_values("cells")
        if "diffusion" not in args.trainers:
            continue
        small = sized.iloc[0]
        for _, large in sized.iloc[1:].iterrows():
            print(f"{mode}: {int(large.cells)} vs {int(small.cells)} cells: "
                  f"autoencoder peak {large.ae_peak_mib / small.ae_peak_mib:.2f}x, "
                  f"diffusion peak {large.diffusion_peak_mib / small.diffusion_peak_mib:.2f}x"
                  if "autoencoder" in args.trainers else
                  f"{mode}: {int(large.cells)} vs {int(small.cells)} cells: "
                  f"diffusion peak {large.diffusion_peak_mib / small.diffusion_peak_mib:.2f}x "
                  f"(its latents: +{large.latents_mib - small.latents_mib:.0f} MiB)")
    return table


if __name__ == "__main__":
    main()
