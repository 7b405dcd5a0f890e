"""The count decoder's output layer in bf16 beside fp32, on a trained autoencoder and real cells: how far the
means move, how many drawn counts change, and the time of both, measured in one run.

    python benchmarks/bench_decoder_precision.py --vae_path checkpoint/demo/latest/autoencoder/model_seed=0_best.pt \
        --data checkpoint/demo/latest/split/heldout.h5ad --threads 2

The cells of ``--data`` (held-out cells: the autoencoder never trained on them) are encoded, and their latents
decoded by the output layer both ways (:func:`VAE.count_model.output_layer_logits`). Printed:

* the logits' absolute change (median, 99th percentile, max) and the relative change of each entry's NB mean
  (softmax x library size; median, 99th percentile, and the share of entries that move by more than 1%);
* the counts drawn from both means with the same uniform ``u`` for every entry, each the NB quantile of ``u``
  (``scipy.stats.nbinom.ppf``, every entry, heavy-tailed ones included): a count changes only where the mean's
  shift moves that entry's quantile, so the share of entries whose count differs bounds how often the two
  precisions can disagree at all (the sampler draws the same distributions, but its random numbers realign
  when the screen's candidates change, so its own same-seed outputs are not a coupling); printed as the
  share of all entries and of the non-zero draws, and the change of each cell's total;
* the time of the output stages per 1,000 cells (decoder, screened draws), fp32 and bf16 interleaved, medians.

The comparison is meaningful on a CPU with native bf16 (AMX / AVX512-BF16) or a CUDA GPU; elsewhere bf16 is
emulated and the timing shows it.
"""
import statistics
import time

import numpy as np
import torch

from guided_diffusion.cli import ArgumentParser, HelpFormatter
from guided_diffusion.data import load_dataset
from guided_diffusion.core.memory import reuse_freed_memory
from VAE.count_model import output_layer_logits
from VAE.VAE_model import load_autoencoder

PRECISIONS = ("fp32", "bf16")


def draw(autoencoder, latents, totals, precision, chunk=1024, seed=0):
    """Counts (scipy CSR) of every cell, chunk by chunk, each chunk's generator seeded by (seed, chunk)."""
    import scipy.sparse as sp

    blocks = []
    for number, start in enumerate(range(0, len(latents), chunk)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + number)
        counts = autoencoder.model.sample_counts(latents[start:start + chunk], totals[start:start + chunk],
                                                 generator, precision=precision)
        blocks.append(sp.csr_matrix((counts.values().numpy(), counts.col_indices().numpy(),
                                     counts.crow_indices().numpy()), shape=tuple(counts.shape)))
    return sp.vstack(blocks).tocsr()


def nb_means(model, latents, totals):
    """Each precision's logits and NB means (softmax x library size) of every entry."""
    hidden = model.decoder[:-1](latents)
    output = model.decoder[-1]
    logits = {p: output_layer_logits(output, hidden, p)(0, len(hidden)) for p in PRECISIONS}
    return logits, {p: torch.softmax(logits[p], dim=1) * totals[:, None] for p in PRECISIONS}


def quantile_coupled_draws(means, theta, seed):
    """Each precision's counts as the NB quantiles of one shared uniform per entry (scipy CSR each). An
    entry whose uniform ``v`` is at least both means draws 0 both ways (1 - P(0) <= mean), so only the
    others are evaluated."""
    import scipy.sparse as sp
    from scipy.stats import nbinom

    mean = {p: m.double().numpy() for p, m in means.items()}
    v = np.random.default_rng(seed).random(mean["fp32"].shape)
    rows, genes = np.nonzero(v < np.maximum(mean["fp32"], mean["bf16"]))
    t = theta.double().numpy()[genes]
    drawn = {}
    for precision, m in mean.items():
        counts = nbinom.ppf(1.0 - v[rows, genes], t, t / (t + m[rows, genes]))
        drawn[precision] = sp.csr_matrix((counts, (rows, genes)), shape=m.shape)
        drawn[precision].eliminate_zeros()
    return drawn


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--vae_path", required=True, help="a count autoencoder (--loss_ae nb)")
    parser.add_argument("--data", required=True, help="cells to encode and decode (held-out cells)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--runs", type=int, default=3, help="interleaved timing rounds (medians reported)")
    parser.add_argument("--seeds", type=int, default=3, help="random streams compared (drawn-count changes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    autoencoder, _ = load_autoencoder(args.vae_path)
    dataset = load_dataset(args.data, label_keys=[], require_labels=False)
    _, _, totals = dataset.rows_and_counts(np.arange(dataset.n_cells))
    latents = autoencoder.encode_dataset(dataset, progress=False)
    latents, totals = torch.from_numpy(latents), torch.as_tensor(totals, dtype=torch.float32)
    with torch.inference_mode():
        logits, means = nb_means(autoencoder.model, latents, totals)
        logit_change = (logits["bf16"] - logits["fp32"]).abs().flatten().numpy()
        relative = ((means["bf16"] - means["fp32"]).abs() / means["fp32"].clamp_min(1e-30)).flatten().numpy()
        theta = torch.exp(autoencoder.model.log_theta.float())
        differ, differ_nonzero, total_change = [], [], []
        for seed in range(args.seeds):
            drawn = quantile_coupled_draws(means, theta, seed)
            change = drawn["bf16"] - drawn["fp32"]
            change.eliminate_zeros()
            differ.append(change.nnz / np.prod(change.shape))
            differ_nonzero.append(change.nnz / max(drawn["fp32"].nnz, 1))
            totals_fp32 = np.asarray(drawn["fp32"].sum(axis=1)).ravel()
            total_change.append(np.median(np.abs(np.asarray(change.sum(axis=1)).ravel()) / totals_fp32))
        seconds = {p: [] for p in PRECISIONS}
        for run in range(args.runs + 1):  # the first round warms up
            for precision in PRECISIONS:
                start = time.perf_counter()
                draw(autoencoder, latents, totals, precision, seed=run)
                if run:
                    seconds[precision].append(time.perf_counter() - start)
    n_cells, n_genes = latents.shape[0], autoencoder.model.num_genes
    print(f"{n_cells} cells of {args.data} x {n_genes} genes, {args.threads} threads; bf16 output layer against fp32")
    print(f"logit change: median {np.median(logit_change):.2e}, 99th percentile {np.quantile(logit_change, 0.99):.2e}, "
          f"max {logit_change.max():.2e}")
    print(f"relative NB-mean change: median {np.median(relative):.2e}, 99th percentile "
          f"{np.quantile(relative, 0.99):.2e}, entries moved by more than 1%: {100 * np.mean(relative > 0.01):.3f}%")
    print(f"drawn counts that differ (same uniforms, {args.seeds} seeds): {100 * np.mean(differ):.4f}% of all "
          f"entries, {100 * np.mean(differ_nonzero):.3f}% of the non-zero draws; median change of a cell's total "
          f"{100 * np.mean(total_change):.4f}%")
    rates = {p: 1000 * statistics.median(seconds[p]) / n_cells for p in PRECISIONS}
    print(f"output stages (decoder + screened draws), medians of {args.runs}: fp32 {rates['fp32']:.3f} s, bf16 "
          f"{rates['bf16']:.3f} s per 1000 cells ({rates['fp32'] / rates['bf16']:.2f}x)")
    return {"logit_change": logit_change, "relative": relative, "differ": differ, "seconds": seconds}


if __name__ == "__main__":
    main()
