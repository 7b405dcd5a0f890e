"""The gene-expression autoencoder: all genes -> 128-d L2-normalized latent -> all genes.

Architecture of the cfDiffusion paper: encoder MLP genes -> 1024 -> 1024 -> 1024 -> latent with
BatchNorm + PReLU (dropout configurable), the latent L2-normalized; decoder mirrored. The encoder
always reads log-normalized expression. Two decoders (``loss_ae``):

* ``mse`` (the original): the decoder outputs log-normalized expression (optional ReLU), trained
  with mean squared error; decoding gives smooth expression.
* ``nb``: the decoder outputs each gene's share of the cell's counts (softmax over genes) and the
  model learns a per-gene negative-binomial dispersion; trained by the negative-binomial likelihood
  of the raw counts (mean = share x the cell's total counts). Decoding can then draw counts, so
  generated cells carry the sampling noise and sparsity of real ones (:meth:`VAE.sample_counts`).
"""
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import Normalization, check_genes

from VAE.autoencoder_checkpoint import AutoencoderCheckpoint

DECODER_ACTIVATIONS = ("ReLU", "linear")
LOSSES = ("mse", "nb")
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


def _mlp_block(in_features, out_features, dropout):
    layers = [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.PReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


class VAE(nn.Module):
    """Deterministic autoencoder (named VAE as in the original project)."""

    def __init__(self, num_genes, latent_dim=128, hidden_dims=(1024, 1024, 1024), dropout=0.0,
                 decoder_activation="ReLU", loss_ae="mse", target_sum=1e4):
        super().__init__()
        if decoder_activation not in DECODER_ACTIVATIONS:
            raise UsageError(f"--decoder_activation must be one of {', '.join(DECODER_ACTIVATIONS)}, "
                             f"got {decoder_activation!r}")
        if loss_ae not in LOSSES:
            raise UsageError(f"--loss_ae must be one of {', '.join(LOSSES)}, got {loss_ae!r}")
        self.num_genes = int(num_genes)
        self.latent_dim = int(latent_dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.dropout = float(dropout)
        self.loss_ae = loss_ae
        self.decoder_activation = decoder_activation if loss_ae == "mse" else "linear"  # nb: logits
        self.target_sum = float(target_sum)

        encoder, width = [], self.num_genes
        for hidden in self.hidden_dims:
            encoder += _mlp_block(width, hidden, self.dropout)
            width = hidden
        encoder.append(nn.Linear(width, self.latent_dim))
        self.encoder = nn.Sequential(*encoder)

        decoder, width = [], self.latent_dim
        for hidden in reversed(self.hidden_dims):
            decoder += _mlp_block(width, hidden, self.dropout)
            width = hidden
        decoder.append(nn.Linear(width, self.num_genes))
        if self.decoder_activation == "ReLU":
            decoder.append(nn.ReLU())
        self.decoder = nn.Sequential(*decoder)
        if loss_ae == "nb":
            self.log_theta = nn.Parameter(torch.zeros(self.num_genes))  # per-gene inverse dispersion
        self.precision = "fp32"  # of the forward's matmuls; a run setting, not part of config()

    @property
    def models_counts(self):
        return self.loss_ae == "nb"

    def init_output_bias(self, gene_means):
        """Start the decoder's output at each gene's mean: its mean log-normalized expression (mse) or
        the log of its mean share of the counts (nb).

        Without it the ReLU output starts at zero for most genes and lowly expressed genes are never
        learned in a short run (their reconstruction stays exactly 0).
        """
        output = [m for m in self.decoder if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            output.bias.copy_(torch.as_tensor(gene_means, dtype=output.bias.dtype))

    def config(self):
        return {"num_genes": self.num_genes, "latent_dim": self.latent_dim, "hidden_dims": list(self.hidden_dims),
                "dropout": self.dropout, "decoder_activation": self.decoder_activation, "loss_ae": self.loss_ae,
                "target_sum": self.target_sum}

    def set_precision(self, precision, device=None):
        """Run the forward's Linear layers in ``precision``: ``fp32``, ``bf16`` (torch.autocast: bfloat16
        matmuls on float32 master weights; the latent normalization, the decoder output, softmax and the
        likelihood stay float32) or ``auto`` (bf16 where ``device`` runs it natively: AMX / AVX512-BF16
        CPUs, CUDA GPUs with bf16). Returns the precision chosen."""
        from guided_diffusion.core.device import resolve_precision

        device = device if device is not None else next(self.parameters()).device
        self.precision = resolve_precision(precision, device)
        return self.precision

    def _matmul_precision(self, x):
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def embed(self, x):
        with self._matmul_precision(x):
            encoded = self.encoder(x)
        return F.normalize(encoded.float(), dim=1)

    def forward(self, x, latent_noise=0.0):
        """(decoder output, latent): log-normalized expression (mse) or per-gene logits (nb), float32.

        ``latent_noise`` (train mode only): the decoder reads the latent plus Gaussian noise of this
        standard deviation per coordinate, so it learns to decode the neighbourhood of each training cell's
        latent, not only the point (the returned latent is the encoder's, without noise)."""
        latent = self.embed(x)
        decoded = latent + latent_noise * torch.randn_like(latent) if latent_noise and self.training else latent
        with self._matmul_precision(decoded):
            output = self.decoder(decoded)
        return output.float(), latent

    def reconstruction_loss(self, output, x, counts=None, totals=None):
        """Mean squared error on log-normalized ``x`` (mse), or the negative-binomial negative
        log-likelihood of the raw ``counts`` given each cell's ``totals``, averaged over entries (nb)."""
        if self.loss_ae == "mse":
            return F.mse_loss(output, x)
        return negative_binomial_nll(F.log_softmax(output, dim=1) + torch.log(totals)[:, None],
                                     self.log_theta, counts)

    def _mean_expression(self, output):
        if self.loss_ae == "mse":
            return output
        return torch.log1p(torch.softmax(output.float(), dim=1) * self.target_sum)

    def _in_eval_mode(self, function, *args):
        was_training = self.training
        self.eval()
        try:
            return function(*args)
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def encode(self, x):
        """Latents of log-normalized expression, computed in eval mode (train mode is restored)."""
        return self._in_eval_mode(self.embed, x)

    @torch.inference_mode()
    def decode(self, latent):
        """Mean log-normalized expression from latents (nb: log1p of the expected share x target_sum),
        computed in eval mode (train mode is restored)."""
        return self._in_eval_mode(lambda z: self._mean_expression(self.decoder(z)), latent)

    @torch.inference_mode()
    def sample_counts(self, latent, totals, generator, method="screened", timings=None, precision="fp32"):
        """Raw counts drawn from the decoded negative binomial: mean = share x ``totals`` (one per cell);
        a sparse CSR tensor (cells x genes). ``method`` ``screened`` (blocks of cells, a random byte per
        entry: :func:`sample_negative_binomial_screened`) or ``dense`` (the path before, a float32 uniform
        per entry: :func:`sample_negative_binomial`) draw the same distribution from different random
        numbers. ``timings``, a dict, gets seconds per sub-step (screened).

        ``precision`` ``bf16`` (screened only) multiplies the output layer (hidden x 20,125 genes, 95% of the
        decoder's work) in bfloat16: its inputs are rounded to bf16 and its product to bf16 before the
        float32 bias, softmax and draws (torch has no bf16 x bf16 -> fp32 product on CPUs), so each logit
        moves by about 2^-9 of its weight term — a relative change of the mean far below the draws' own
        spread (:func:`output_layer_logits`). ``fp32`` is the exact decoder."""
        if not self.models_counts:
            raise UsageError("this autoencoder was trained with --loss_ae mse and has no count model; "
                             "decode the mean expression instead (--observation mean)")
        theta = torch.exp(self.log_theta.float())
        if method == "dense" and precision != "fp32":
            raise ValueError("precision bf16 applies to the screened draws; the dense path decodes in fp32")
        if method == "dense":  # the path before: the whole mean matrix, a float32 uniform per entry
            shares = self._in_eval_mode(lambda z: torch.softmax(self.decoder(z).float(), dim=1), latent)
            return sample_negative_binomial(shares * totals[:, None], theta, generator)
        if method != "screened":
            raise ValueError(f"method must be 'screened' or 'dense', not {method!r}")
        clock = _SubStepClock(timings)
        with clock("decoder hidden layers"):
            hidden = self._in_eval_mode(lambda z: self.decoder[:-1](z), latent)
        with clock("decoder output layer"):
            block_logits = output_layer_logits(self.decoder[-1], hidden, precision)
        return sample_negative_binomial_screened(block_logits, totals, theta, generator, timings=timings)


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


def sample_negative_binomial(mean, theta, generator):
    """Exact draws from NB(mean, theta) (variance mean + mean^2 / theta), reproducible from ``generator``.

    ``mean`` is (cells, genes), ``theta`` (genes,); returns the draws as a sparse CSR tensor (float32).
    By inverse CDF with one uniform ``v`` per entry: the draw is 0 when ``v >= 1 - P(0)``, and since
    ``1 - P(0) <= mean``, entries with ``v >= mean`` (most of an expression matrix) are 0 without further
    work. The remaining candidates walk the NB probability recursion in float64 until the CDF passes
    ``1 - v``. Entries with a heavy tail or a large mean (success ratio above ``INVERSE_CDF_MAX_RATIO`` or
    mean above ``INVERSE_CDF_MAX_MEAN``; their uniform is not used) are drawn as Poisson(Gamma(theta,
    mean / theta)) instead, as are the walks not finished within ``INVERSE_CDF_MAX_STEPS`` (a probability
    below ~1e-10 per entry; before the mean bound, entries of genes with a large theta could walk past
    256 steps often, e.g. a third of the entries of mean 240 at theta 30, and were then drawn again
    from the whole distribution: too few large counts).

    This is the dense form (a float32 uniform for every entry); :func:`sample_negative_binomial_screened`
    draws the same distribution with a byte per entry and is what :meth:`VAE.sample_counts` uses.
    """
    n_cells, n_genes = mean.shape
    flat_mean = mean.reshape(-1)
    v = torch.rand(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    heavy_threshold = _heavy_threshold(theta)
    candidate_mask = v < mean
    if heavy_threshold.min() < 1:  # otherwise every heavy entry has mean > 1 > v and is a candidate already
        candidate_mask |= mean > heavy_threshold
    candidates = torch.nonzero(candidate_mask.view(-1)).squeeze(1)  # sorted flat positions
    genes = candidates % n_genes
    draws = _inverse_cdf_draws(flat_mean.index_select(0, candidates),
                               1.0 - v.view(-1).index_select(0, candidates).double(), theta, genes,
                               heavy_threshold, generator)
    nonzero = torch.nonzero(draws).squeeze(1)
    return _csr(candidates[nonzero], draws[nonzero], n_cells, n_genes)


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


def sample_negative_binomial_screened(logits, totals, theta, generator, block_rows=NB_BLOCK_ROWS, timings=None):
    """Exact draws from NB(softmax(logits) x totals, theta), the same distribution as
    :func:`sample_negative_binomial`, from the decoder's logits (cells x genes, float32; or a function
    (start, stop) -> those rows' logits, so that they are computed block by block) in blocks of
    ``block_rows`` cells (each block's float32 arrays are tens of MB, kept in reused memory).

    The uniform of every entry is drawn in two parts, ``v = (b + w) / 256``: a random byte ``b`` for every
    entry and, only where ``b < 256 x mean`` (else ``v >= mean >= 1 - P(0)`` and the draw is 0; about 1.2x
    the non-zero entries), a float64 ``w`` on [0, 1). ``v`` is then uniform on [0, 1) as a single uniform
    would be (with 61 bits instead of float32's 24), and the candidates are drawn by inverse CDF /
    Gamma-Poisson exactly as by :func:`sample_negative_binomial`. The mean is the same float32 product
    softmax x total. Returns a sparse CSR tensor (float32); ``timings``, a dict, gets seconds per sub-step.
    """
    n_cells, n_genes = len(totals), len(theta)
    device = theta.device
    block_logits = logits if callable(logits) else (lambda start, stop: logits[start:stop])
    heavy_threshold = _heavy_threshold(theta)
    check_heavy = bool(heavy_threshold.min() < 1)  # else heavy entries have 256 x mean > 256 > any byte
    scale = (totals.float() * 256.0)[:, None]  # x 256 exactly: the float32 mean's bits are kept
    clock = _SubStepClock(timings)
    positions, means, uniforms = [], [], []
    for start in range(0, n_cells, block_rows):
        stop = min(start + block_rows, n_cells)
        with clock("decoder output layer"):
            block = block_logits(start, stop)
        with clock("softmax x library size"):
            mean256 = torch.softmax(block.float(), dim=1).mul_(scale[start:stop])
            del block
        with clock("random bytes"):
            bytes_ = _random_bytes(mean256.numel(), generator, device).view(mean256.shape)
        with clock("screen (byte < 256 mean)"):
            mask = bytes_.to(torch.float32) < mean256
            if check_heavy:
                mask |= mean256 > heavy_threshold * 256.0
            candidates = _flat_nonzero(mask.view(-1)).to(device)
            positions.append(candidates + start * n_genes)
            means.append(mean256.view(-1).index_select(0, candidates) / 256.0)  # exact: the float32 mean
            uniforms.append(bytes_.view(-1).index_select(0, candidates))
    with clock("inverse CDF / Gamma-Poisson"):
        positions, mean = torch.cat(positions), torch.cat(means)
        u = 1.0 - (torch.cat(uniforms).double() + _fine_uniforms(len(positions), generator, device)) / 256.0
        draws = _inverse_cdf_draws(mean, u, theta, positions % n_genes, heavy_threshold, generator)
        nonzero = _flat_nonzero(draws > 0).to(device)
    with clock("CSR"):
        return _csr(positions.index_select(0, nonzero), draws.index_select(0, nonzero), n_cells, n_genes)


class _SubStepClock:
    def __init__(self, timings):
        self.timings = timings

    @contextmanager
    def __call__(self, name):
        if self.timings is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


class Autoencoder:
    """A trained autoencoder with the input space it was trained on (genes, normalization)."""

    def __init__(self, model, genes, normalization, path=""):
        self.model = model
        self.genes = list(genes)
        self.normalization = normalization
        self.path = path

    @property
    def device(self):
        return next(self.model.parameters()).device

    def check_dataset(self, dataset):
        """Refuse data whose genes or input kind (raw counts / log-normalized) differ from the training data's."""
        check_genes(self.genes, dataset.genes, what=f"the autoencoder {self.path}")
        if self.normalization.input_is_log != dataset.normalization.input_is_log:
            raise UsageError(f"the autoencoder was trained on "
                             f"{'log-normalized' if self.normalization.input_is_log else 'raw-count'} "
                             f"input but --input_is_log is {dataset.normalization.input_is_log}")

    def encode_dataset(self, dataset, batch_size=1024, progress=True):
        """Latents of every cell, encoded in batches (the matrix is densified one batch at a time)."""
        latents = np.empty((dataset.n_cells, self.model.latent_dim), dtype=np.float32)
        starts = range(0, dataset.n_cells, batch_size)
        for start in tqdm(starts, desc="encode", disable=not progress, unit="batch"):
            index = np.arange(start, min(start + batch_size, dataset.n_cells))
            batch = torch.from_numpy(dataset.rows(index)).to(self.device)
            latents[index] = self.model.encode(batch).cpu().numpy()
        return latents


def load_autoencoder(path, device="cpu"):
    """Rebuild the autoencoder from its checkpoint alone (weights + config + genes + normalization);
    returns it with its :class:`~VAE.autoencoder_checkpoint.AutoencoderCheckpoint`."""
    checkpoint = AutoencoderCheckpoint.load(path)
    model = VAE(**checkpoint.model_config)
    model.load_state_dict(checkpoint.state_dict)
    model.to(device).eval()
    return Autoencoder(model, checkpoint.genes, Normalization.from_dict(checkpoint.normalization), path), checkpoint
