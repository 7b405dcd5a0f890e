"""The autoencoder's count model: the negative-binomial likelihood it is trained by and the count draws.

With ``--loss_ae nb`` the decoder's output is a logit per gene: softmax over genes gives each gene's share of
the cell's counts, and each gene has a learned inverse dispersion ``theta`` (``VAE.log_theta``). Training
minimises :func:`negative_binomial_nll` of the raw counts (mean = share x the cell's total counts);
sampling draws counts from that negative binomial (:func:`sample_counts`, block by block:
:func:`sample_negative_binomial_screened`), the output layer optionally in bfloat16
(:func:`output_layer_logits`).
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion.core.errors import UsageError

# inverse-CDF draws handle entries whose NB success ratio mean / (theta + mean) is at most this;
# heavier-tailed entries (highly expressed genes) are drawn as Poisson(Gamma) instead
INVERSE_CDF_MAX_RATIO = 0.9
INVERSE_CDF_MAX_STEPS = 256
# ... and so are entries with a mean above this: their walks would be long, and with a mean <= 16 and a
# ratio <= 0.9 a walk is unfinished after 256 steps with probability below ~1e-10 per entry
INVERSE_CDF_MAX_MEAN = 16.0
# cells per block of the screened count draws (a block's float32 cells x 20,125 arrays are ~41 MB): 512 ran a
# 1,024-cell chunk 1.22x (2 threads) / 1.15x (1 thread) faster than 128 on an idle machine, 1,024 slower on one
# thread (`benchmarks/bench_scale.py --block_rows`, README Speed); the draws do not depend on it
NB_BLOCK_ROWS = 512


@torch.inference_mode()
def sample_counts(model, latent, totals, generator, precision="fp32", labels=None):
    """Raw counts drawn from ``model``'s decoded negative binomial: mean = share x ``totals`` (one per cell);
    a sparse CSR tensor (cells x genes), drawn in blocks of cells with a random byte per entry
    (:func:`sample_negative_binomial_screened`).

    ``precision`` ``bf16`` multiplies the output layer (hidden x 20,125 genes, 95% of the decoder's work) in
    bfloat16: its inputs are rounded to bf16 and its product to bf16 before the float32 bias, softmax and
    draws (torch has no bf16 x bf16 -> fp32 product on CPUs), so each logit moves by about 2^-9 of its weight
    term — a relative change of the mean far below the draws' own spread (:func:`output_layer_logits`).
    ``fp32`` is the exact decoder. ``labels``: each latent's label codes (cells x keys), for a decoder that reads
    labels (their shift of the output layer is added to each block's logits in float32)."""
    if not model.models_counts:
        raise UsageError("this autoencoder was trained with --loss_ae mse and has no count model; "
                         "decode the mean expression instead (--observation mean)")
    theta = torch.exp(model.log_theta.float())
    hidden = model._in_eval_mode(lambda z: model.run_decoder(z, labels, stop=-1), latent)
    block_logits = output_layer_logits(model.decoder[-1], hidden, precision)
    if model.reads_labels:
        codes, plain_logits = model._label_codes(labels, len(latent), latent.device), block_logits
        block_logits = lambda start, stop: (plain_logits(start, stop)  # noqa: E731
                                            + model.output_label_effect(codes[start:stop]).float())
    return sample_negative_binomial_screened(block_logits, totals, theta, generator)


def output_layer_logits(output, hidden, precision="fp32"):
    """A function (start, stop) -> the logits of those rows of ``hidden`` (float32), the output layer
    applied block by block (no cells x genes matrix at once). ``bf16``: the weight is cast once here and
    each block multiplied in bfloat16, its product rounded to bf16 and the bias added in float32 (a logit
    moves by at most 2^-9 of |hidden . weight| plus the inputs' rounding); ``fp32``: F.linear as trained."""
    if precision == "fp32":
        return lambda start, stop: F.linear(hidden[start:stop], output.weight, output.bias)
    if precision != "bf16":
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
    weight_t = output.weight.to(torch.bfloat16).t()
    hidden_bf16 = hidden.to(torch.bfloat16)
    bias = output.bias.float()
    return lambda start, stop: torch.mm(hidden_bf16[start:stop], weight_t).float().add_(bias)


def negative_binomial_nll(log_mean, log_theta, counts):
    """Mean over entries of -log NB(counts | mean, theta), from log mean and per-gene log theta.

    With d = log mean - log theta, log NB = -theta softplus(d) - counts softplus(-d) + lgamma(counts + theta)
    - lgamma(theta) - lgamma(counts + 1). Every term but the first is 0 where counts = 0, so they are
    evaluated on the non-zero counts only (~9% of a Baron batch): the same value as the dense formula
    (up to summation order) at a fraction of its lgamma / digamma work, forward and backward. The
    lgamma(theta) term depends on the gene only: it is summed per gene, weighted by the gene's number of
    non-zero counts. Gathers are ``index_select`` (backward ``index_add_``; indexing's backward,
    ``index_put_`` with accumulation, took 17 ms per step of a 128-cell batch on 2 threads).
    """
    n_genes = log_mean.shape[-1]
    theta = torch.exp(log_theta)
    log_mean, counts = log_mean.reshape(-1, n_genes), counts.reshape(-1, n_genes)
    dense = (F.softplus(log_mean - log_theta).sum(dim=0) * theta).sum()
    flat_counts = counts.reshape(-1)
    positions = _flat_nonzero(flat_counts.detach() != 0).to(flat_counts.device)
    genes = positions % n_genes
    c, log_t = flat_counts.index_select(0, positions), log_theta.index_select(0, genes)
    d = log_mean.reshape(-1).index_select(0, positions) - log_t
    nonzero_per_gene = torch.bincount(genes, minlength=n_genes).to(theta.dtype)
    sparse = ((c * F.softplus(-d) - torch.lgamma(c + torch.exp(log_t)) + torch.lgamma(c + 1)).sum()
              + (nonzero_per_gene * torch.lgamma(theta)).sum())
    return (dense + sparse) / counts.numel()


def negative_binomial_nll_per_gene(log_mean, log_theta, counts):
    """Per gene, the mean over cells of -log NB(counts | mean, theta): :func:`negative_binomial_nll`'s terms summed
    by gene (their sum over genes is that mean over entries times the number of genes). Each entry of the result
    depends on its gene's ``log_theta`` only, so one backward pass gives every gene's own derivative."""
    n_cells, n_genes = log_mean.shape
    theta = torch.exp(log_theta)
    dense = F.softplus(log_mean - log_theta).sum(dim=0) * theta
    flat_counts = counts.reshape(-1)
    positions = _flat_nonzero(flat_counts.detach() != 0).to(flat_counts.device)
    genes = positions % n_genes
    c, log_t = flat_counts.index_select(0, positions), log_theta.index_select(0, genes)
    d = log_mean.reshape(-1).index_select(0, positions) - log_t
    terms = c * F.softplus(-d) - torch.lgamma(c + torch.exp(log_t)) + torch.lgamma(c + 1)
    nonzero_per_gene = torch.bincount(genes, minlength=n_genes).to(theta.dtype)
    sparse = torch.zeros_like(dense).index_add(0, genes, terms) + nonzero_per_gene * torch.lgamma(theta)
    return (dense + sparse) / n_cells


def _heavy_threshold(theta):
    """The mean above which an entry of each gene is drawn as Gamma-Poisson: ratio mean / (theta + mean)
    above INVERSE_CDF_MAX_RATIO (mean > theta r / (1 - r)) or mean above INVERSE_CDF_MAX_MEAN."""
    return torch.clamp(theta * (INVERSE_CDF_MAX_RATIO / (1 - INVERSE_CDF_MAX_RATIO)), max=INVERSE_CDF_MAX_MEAN)


def _inverse_cdf_draws(mean, u, theta, genes, heavy_threshold, generator):
    """NB draws (float32) of the candidate entries with float32 ``mean`` of genes ``genes``: the number of
    k >= 0 with CDF(k) < ``u`` (float64, uniform on (0, 1]), or Gamma-Poisson for heavy-tailed entries."""
    device = mean.device
    m, t = mean.double(), theta.index_select(0, genes).double()
    heavy = m > heavy_threshold.index_select(0, genes).double()
    ratio = m / (t + m)
    probability = torch.exp(t * torch.log1p(-ratio))  # P(0)
    cdf = probability.clone()
    u = u.masked_fill(heavy, 0.0)  # heavy entries never walk (CDF(0) >= 0)
    # the draw is the number of k >= 0 with CDF(k) < u: walk k upwards on every candidate (in place, no
    # gathers) until k = 2, where most are finished, then only on the rest, dropping finished entries at
    # k = 2, 4, 8, ... (dropping every step would cost more than the steps themselves)
    drawn = (cdf < u).double()
    k_plus_t = t
    below = torch.empty_like(u, dtype=torch.bool)
    below_count = torch.empty_like(drawn)  # below as 0 / 1, converted into a reused buffer
    walk, draws = None, None  # walk None: the entries are still every candidate, in order
    k, next_drop = 0, 2
    while walk is None or walk.numel():
        probability.mul_(k_plus_t).mul_(ratio).div_(k + 1)  # P(k + 1) = P(k) (k + t) / (k + 1) ratio
        k += 1
        k_plus_t.add_(1.0)
        cdf.add_(probability)
        torch.lt(cdf, u, out=below)
        drawn.add_(below_count.copy_(below))
        if k == next_drop or k == INVERSE_CDF_MAX_STEPS:
            keep = _flat_nonzero(below).to(device)
            if walk is None:
                draws = drawn.float().masked_fill_(below, 0.0)
                walk = keep
            else:
                finished = _flat_nonzero(~below).to(device)
                draws.index_put_((walk.index_select(0, finished),), drawn.index_select(0, finished).float())
                walk = walk.index_select(0, keep)
            u, ratio, k_plus_t, probability, cdf, drawn = (
                a.index_select(0, keep) for a in (u, ratio, k_plus_t, probability, cdf, drawn))
            below, below_count = below[:len(keep)], below_count[:len(keep)]
            next_drop *= 2
            if k == INVERSE_CDF_MAX_STEPS:
                break
    rest = torch.cat([walk, _flat_nonzero(heavy).to(device)])  # entries for Gamma-Poisson
    if rest.numel():
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))
        rest_theta = theta[genes[rest]].float()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            rate = torch._standard_gamma(rest_theta) * (mean[rest].float() / rest_theta)
            draws[rest] = torch.poisson(rate)
    return draws


def _csr(positions, values, n_cells, n_genes):
    """A CSR tensor from sorted flat positions (row-major) and their values."""
    rows = torch.div(positions, n_genes, rounding_mode="floor")
    crow = torch.zeros(n_cells + 1, dtype=torch.int64, device=positions.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_cells), dim=0)
    with warnings.catch_warnings():  # torch marks sparse CSR tensors as beta; building one is all we do
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, positions - rows * n_genes, values, size=(n_cells, n_genes),
                                       check_invariants=False)


def _random_bytes(count, generator, device):
    """``count`` independent uniform bytes (uint8), eight per 64-bit draw of ``generator``."""
    words = torch.empty(-(-count // 8), dtype=torch.int64, device=device)
    words.random_(-2 ** 63, None, generator=generator)  # the full 64-bit range, every bit uniform
    return words.view(torch.uint8)[:count]


def _fine_uniforms(count, generator, device):
    """``count`` float64 uniforms on [0, 1) with 53 random bits each."""
    words = torch.empty(count, dtype=torch.int64, device=device).random_(0, 2 ** 53, generator=generator)
    return words.double() * 2.0 ** -53


def _flat_nonzero(mask):
    if mask.device.type == "cpu":  # numpy's is several times faster than torch.nonzero on a CPU
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask.view(-1)).squeeze(1)


def sample_negative_binomial_screened(logits, totals, theta, generator, block_rows=NB_BLOCK_ROWS):
    """Exact draws from NB(softmax(logits) x totals, theta) (variance mean + mean^2 / theta), reproducible
    from ``generator``, from the decoder's logits (cells x genes, float32; or a function (start, stop) ->
    those rows' logits, so that they are computed block by block) in blocks of ``block_rows`` cells (each
    block's float32 arrays are tens of MB, kept in reused memory).

    The uniform of every entry is drawn in two parts, ``v = (b + w) / 256``: a random byte ``b`` for every
    entry and, only where ``b < 256 x mean`` (else ``v >= mean >= 1 - P(0)`` and the draw is 0; about 1.2x
    the non-zero entries), a float64 ``w`` on [0, 1). ``v`` is then uniform on [0, 1) as a single uniform
    would be (with 61 bits instead of float32's 24), and the candidates are drawn by inverse CDF:
    the NB probability recursion walked in float64 until the CDF passes ``1 - v``. Entries with a heavy
    tail or a large mean (success ratio above ``INVERSE_CDF_MAX_RATIO`` or mean above
    ``INVERSE_CDF_MAX_MEAN``) are drawn as Poisson(Gamma(theta, mean / theta)) instead, as are the walks
    not finished within ``INVERSE_CDF_MAX_STEPS`` (a probability below ~1e-10 per entry). The mean is the
    float32 product softmax x total. Returns a sparse CSR tensor (float32).
    """
    n_cells, n_genes = len(totals), len(theta)
    device = theta.device
    block_logits = logits if callable(logits) else (lambda start, stop: logits[start:stop])
    heavy_threshold = _heavy_threshold(theta)
    check_heavy = bool(heavy_threshold.min() < 1)  # else heavy entries have 256 x mean > 256 > any byte
    scale = (totals.float() * 256.0)[:, None]  # x 256 exactly: the float32 mean's bits are kept
    positions, means, uniforms = [], [], []
    for start in range(0, n_cells, block_rows):
        stop = min(start + block_rows, n_cells)
        block = block_logits(start, stop)
        mean256 = torch.softmax(block.float(), dim=1).mul_(scale[start:stop])
        del block
        bytes_ = _random_bytes(mean256.numel(), generator, device).view(mean256.shape)
        mask = bytes_.to(torch.float32) < mean256
        if check_heavy:
            mask |= mean256 > heavy_threshold * 256.0
        candidates = _flat_nonzero(mask.view(-1)).to(device)
        positions.append(candidates + start * n_genes)
        means.append(mean256.view(-1).index_select(0, candidates) / 256.0)  # exact: the float32 mean
        uniforms.append(bytes_.view(-1).index_select(0, candidates))
    positions, mean = torch.cat(positions), torch.cat(means)
    u = 1.0 - (torch.cat(uniforms).double() + _fine_uniforms(len(positions), generator, device)) / 256.0
    draws = _inverse_cdf_draws(mean, u, theta, positions % n_genes, heavy_threshold, generator)
    nonzero = _flat_nonzero(draws > 0).to(device)
    return _csr(positions.index_select(0, nonzero), draws.index_select(0, nonzero), n_cells, n_genes)
