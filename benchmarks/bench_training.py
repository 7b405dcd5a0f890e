"""Autoencoder training throughput: steps/s of today's path and of each candidate, measured in one run.

    python benchmarks/bench_training.py --threads 1                 # steps/s table (interleaved, medians)
    python benchmarks/bench_training.py --threads 2 --quality_steps 300   # + held-out NB loss after 300 steps

The model is the default count autoencoder (20,125 genes -> 1024 -> 1024 -> 1024 -> 128 and back, NB loss)
on batches of the bundled Baron cells. One model and optimizer serve every variant; each round runs every
variant in turn (``--steps`` timed steps after one warm-up step), and the median over ``--runs`` rounds is
reported, so machine load hits all variants alike. Variants:

* ``today``: float32, the dense NB formula (lgamma of every entry), glibc's default allocation;
* ``sparse NB``: the NB likelihood of :func:`VAE.count_model.negative_binomial_nll` (lgamma terms on the
  non-zero counts only; lgamma(theta) per gene; ``index_select`` gathers);
* ``before``: the adopted path with the earlier form of the sparse likelihood (CHANGELOG.md)
  (:func:`indexed_negative_binomial_nll`: gathers by indexing, lgamma(theta) on every non-zero entry);
* ``heap reuse``: :func:`guided_diffusion.core.memory.reuse_freed_memory` (no page faults on the step's
  large buffers);
* ``bf16``: :meth:`VAE.set_precision` (``torch.autocast`` matmuls, fp32 master weights and likelihood);
* ``CSR first layer``: the first Linear multiplies the sparse (CSR) batch, forward and weight gradient
  (:class:`SparseInputLinear`);
* ``bound: ...``: the adopted step without the optimizer update, and without both the update and the NB
  likelihood (the loss is then the mean log mean, :func:`no_likelihood`) — not training steps, but what the
  rest costs: a bound on any faster optimizer or likelihood.

Useful GFLOP/s count 2 x multiply-adds of the Linear layers per step (forward, weight gradients, input
gradients except the first layer's), against the fp32 and bf16 2048^3 matmul peaks measured in the run.
``--quality_steps N`` then trains today's path and the adopted one N steps each from the same seed on
the same batches and prints the held-out NB loss of both (evaluated in fp32).
"""
import os
import statistics
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_sampling import matmul_peak_gflops
from guided_diffusion.cli import ArgumentParser, HelpFormatter
from guided_diffusion.data import load_dataset, make_batch_sampler, split_train_validation
from guided_diffusion.core.memory import reuse_freed_memory
from guided_diffusion.training.optim import adamw
from VAE.autoencoder_training import evaluate_reconstruction, output_bias
from VAE.count_model import negative_binomial_nll
from VAE.VAE_model import VAE


def dense_negative_binomial_nll(log_mean, log_theta, counts):
    """Today's formula: every term on every entry (the reference for the sparse one)."""
    theta = torch.exp(log_theta)
    log_theta_plus_mean = torch.logaddexp(log_theta, log_mean)
    log_likelihood = (theta * (log_theta - log_theta_plus_mean) + counts * (log_mean - log_theta_plus_mean)
                      + torch.lgamma(counts + theta) - torch.lgamma(theta) - torch.lgamma(counts + 1))
    return -log_likelihood.mean()


def indexed_negative_binomial_nll(log_mean, log_theta, counts):
    """The sparse formula before: gathers by indexing (backward ``index_put_`` with accumulation) and
    lgamma(theta) / its digamma on every non-zero entry."""
    n_genes = log_mean.shape[-1]
    theta = torch.exp(log_theta)
    log_mean, counts = log_mean.reshape(-1, n_genes), counts.reshape(-1, n_genes)
    dense = (F.softplus(log_mean - log_theta).sum(dim=0) * theta).sum()
    positions = torch.nonzero(counts.reshape(-1)).squeeze(1)
    genes = positions % n_genes
    c, t = counts.reshape(-1)[positions], theta[genes]
    d = log_mean.reshape(-1)[positions] - log_theta[genes]
    sparse = (c * F.softplus(-d) - torch.lgamma(c + t) + torch.lgamma(t) + torch.lgamma(c + 1)).sum()
    return (dense + sparse) / counts.numel()


class SparseInputLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` for a sparse CSR ``x`` (no gradient to ``x``): the forward and the weight
    gradient multiply only the stored entries."""

    @staticmethod
    def forward(ctx, x_csr, weight, bias):
        ctx.save_for_backward(x_csr)
        return torch.addmm(bias, x_csr, weight.t())

    @staticmethod
    def backward(ctx, grad_output):
        (x_csr,) = ctx.saved_tensors
        grad_weight = torch.sparse.mm(x_csr.t(), grad_output).t()
        return None, grad_weight, grad_output.sum(dim=0)


def to_csr(x):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return x.to_sparse_csr()


def forward_with_csr_input(model, x):
    first = model.encoder[0]
    hidden = SparseInputLinear.apply(to_csr(x), first.weight, first.bias)
    latent = F.normalize(model.encoder[1:](hidden), dim=1)
    return model.decoder(latent), latent


def no_likelihood(log_mean, log_theta, counts):
    """(For the bound rows.) A loss without the NB likelihood: the mean log mean, whose gradient still
    reaches every layer."""
    return log_mean.mean()


def training_step(model, optimizer, batch, nll, csr_input, update=True):
    x, counts, totals = batch
    output, _ = forward_with_csr_input(model, x) if csr_input else model(x)
    loss = nll(F.log_softmax(output, dim=1) + torch.log(totals)[:, None], model.log_theta, counts)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if update:
        optimizer.step()
    return loss


VARIANTS = {  # name: (nll, precision, heap reuse, CSR first layer, optimizer update)
    "today (fp32, dense NB)": (dense_negative_binomial_nll, "fp32", False, False, True),
    "sparse NB": (negative_binomial_nll, "fp32", False, False, True),
    "sparse NB + heap reuse": (negative_binomial_nll, "fp32", True, False, True),
    "sparse NB + heap reuse + CSR first layer": (negative_binomial_nll, "fp32", True, True, True),
    "sparse NB + bf16": (negative_binomial_nll, "bf16", False, False, True),
    "before: indexed sparse NB + bf16 + heap": (indexed_negative_binomial_nll, "bf16", True, False, True),
    "adopted: sparse NB + bf16 + heap reuse": (negative_binomial_nll, "bf16", True, False, True),
    "bound: adopted without the optimizer update": (negative_binomial_nll, "bf16", True, False, False),
    "bound: adopted without the update and the likelihood": (no_likelihood, "bf16", True, False, False),
}
TODAY, ADOPTED = "today (fp32, dense NB)", "adopted: sparse NB + bf16 + heap reuse"
BEFORE = "before: indexed sparse NB + bf16 + heap"


def useful_flops_per_step(model, batch_size):
    linears = [m for m in [*model.encoder, *model.decoder] if isinstance(m, torch.nn.Linear)]
    macs = sum(m.in_features * m.out_features for m in linears)
    first = linears[0].in_features * linears[0].out_features
    return 2 * batch_size * (3 * macs - first)


def fetch_batch(dataset, index):
    return tuple(torch.from_numpy(a) for a in dataset.rows_and_counts(index))


def time_variants(model, optimizer, batches, args):
    seconds = {name: [] for name in VARIANTS}
    for _ in range(args.runs):
        for name, (nll, precision, heap, csr_input, update) in VARIANTS.items():
            reuse_freed_memory(heap)
            model.set_precision(precision)
            training_step(model, optimizer, batches[0], nll, csr_input, update)
            start = time.perf_counter()
            for batch in batches[1:args.steps + 1]:
                training_step(model, optimizer, batch, nll, csr_input, update)
            seconds[name].append((time.perf_counter() - start) / args.steps)
    reuse_freed_memory(False)
    return {name: statistics.median(values) for name, values in seconds.items()}


def train_for_quality(dataset, train_index, val_index, variant, args):
    nll, precision, heap, csr_input, _ = VARIANTS[variant]
    reuse_freed_memory(heap)
    torch.manual_seed(args.seed)
    model = VAE(dataset.n_genes, loss_ae="nb", target_sum=dataset.normalization.target_sum)
    model.init_output_bias(output_bias(dataset, train_index, True, args.seed))
    optimizer = adamw(model.parameters(), lr=1e-3, weight_decay=1e-5)
    sampler = make_batch_sampler(dataset, train_index, args.batch_size, args.seed)
    model.set_precision(precision)
    start = time.perf_counter()
    for _ in range(args.quality_steps):
        training_step(model, optimizer, fetch_batch(dataset, sampler.next_batch()), nll, csr_input)
    seconds = time.perf_counter() - start
    model.set_precision("fp32")
    report = evaluate_reconstruction(model, dataset, val_index)
    reuse_freed_memory(False)
    return report, seconds


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (the median is reported)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--data", default=os.path.join(ROOT, "dataset", "baron_human.h5ad"))
    parser.add_argument("--quality_steps", type=int, default=0,
                        help="also train today's and the adopted path this many steps and compare held-out NB loss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data, label_keys=[], require_labels=False)
    train_index, val_index = split_train_validation(dataset.n_cells, 0.1, args.seed)
    rng = np.random.default_rng(args.seed)
    batches = [fetch_batch(dataset, np.sort(rng.choice(train_index, args.batch_size, replace=False)))
               for _ in range(args.steps + 1)]
    zeros = float((batches[0][1] == 0).float().mean())
    peak, peak_bf16 = matmul_peak_gflops(), matmul_peak_gflops(dtype=torch.bfloat16)
    torch.manual_seed(args.seed)
    model = VAE(dataset.n_genes, loss_ae="nb")
    optimizer = adamw(model.parameters(), lr=1e-3, weight_decay=1e-5)
    medians = time_variants(model, optimizer, batches, args)
    flops = useful_flops_per_step(model, args.batch_size)
    print(f"{dataset.n_genes} genes, batch {args.batch_size} ({100 * zeros:.1f}% zeros), {args.threads} thread(s); "
          f"matmul peak fp32 {peak:.0f} GFLOP/s, bf16 {peak_bf16:.0f} GFLOP/s; {flops / 1e9:.1f} useful GFLOP "
          f"per step; median of {args.runs} interleaved rounds of {args.steps} steps")
    print(f"{'variant':<54} {'steps/s':>8} {'ms/step':>8} {'vs today':>9} {'GFLOP/s':>8} {'% fp32 pk':>9} "
          f"{'% bf16 pk':>9}")
    for name, seconds in medians.items():
        gflops = flops / seconds / 1e9
        print(f"{name:<54} {1 / seconds:>8.2f} {1000 * seconds:>8.1f} {medians[TODAY] / seconds:>8.2f}x "
              f"{gflops:>8.0f} {100 * gflops / peak:>8.0f}% {100 * gflops / peak_bf16:>8.0f}%", flush=True)
    print(f"adopted vs the path adopted before (indexed sparse NB): {medians[BEFORE] / medians[ADOPTED]:.3f}x")
    if args.quality_steps:
        for variant in (TODAY, ADOPTED):
            report, seconds = train_for_quality(dataset, train_index, val_index, variant, args)
            print(f"{variant:<54} after {args.quality_steps} steps ({seconds:.0f} s): held-out NB loss "
                  f"{report['loss']:.5f}, MSE {report['mse']:.5f}, median cell Pearson "
                  f"{report['median_cell_pearson']:.4f} ({report['n_cells']} cells)", flush=True)
    return medians


if __name__ == "__main__":
    main()
