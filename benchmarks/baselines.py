"""What the benchmarks compare the product code against, and how they time it; not product code.

* the variants measured and not adopted, or replaced, kept frozen here: the dense count draws
  (:func:`sample_negative_binomial`, :func:`sample_counts_dense`: a float32 uniform per entry over the whole
  chunk), the h5ad layout with X's indices and indptr stored twice (``share_pattern=False``), the diffusion
  training step with per-block projections and a per-tensor EMA (:class:`TodayTrainer`), the one-cast and
  forward+backward-only trainers;
* the profiling hooks: :class:`SubStepClock`, :func:`timed_sample_counts` (the product's screened draws with
  seconds per sub-step) and :func:`writer_variant` (``write_decoded_h5ad`` with seconds per stage and the
  variants above), which patch the product modules for the duration of a ``with`` block.
"""
import contextlib
import sys
import threading
import time

import torch

from guided_diffusion.diffusion import denoiser as cell_model
from guided_diffusion.sampling import writer
from guided_diffusion.training.trainer import DiffusionTrainer
from VAE import count_model
from VAE.count_model import _csr, _heavy_threshold, _inverse_cdf_draws
from VAE.VAE_model import VAE


# ---- profiling ------------------------------------------------------------------------------------
class SubStepClock:
    """Seconds per named sub-step, summed into ``timings`` (a dict; None: nothing recorded)."""

    def __init__(self, timings):
        self.timings = timings
        self._lock = threading.Lock()  # the h5ad writes are timed on the writer thread

    def add(self, name, seconds):
        if self.timings is not None:
            with self._lock:
                self.timings[name] = self.timings.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def wrap(self, name, function):
        """``function`` with each call's seconds added to ``name``."""
        def timed(*args, **kwargs):
            with self(name):
                return function(*args, **kwargs)
        return timed


@contextlib.contextmanager
def patched(*replacements):
    """Set (object, attribute, value) for the ``with`` block, then restore the originals."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    try:
        for owner, name, value in replacements:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


SCREEN_REST = "softmax x library size + screen"


@torch.inference_mode()
def timed_sample_counts(model, latent, totals, generator, timings, precision="fp32"):
    """:meth:`VAE.sample_counts` (the product's screened draws: the same draws) with seconds per sub-step added
    to ``timings``: the decoder's hidden and output layers, the random bytes, the inverse CDF / Gamma-Poisson
    draws, the CSR assembly and, as the rest of the blocked loop, softmax x library size + the screen."""
    clock = SubStepClock(timings)
    with clock("decoder hidden layers"):
        hidden = model._in_eval_mode(lambda z: model.decoder[:-1](z), latent)
    theta = torch.exp(model.log_theta.float())
    measured = {}
    inner = SubStepClock(measured)
    block_logits = inner.wrap("decoder output layer",
                              count_model.output_layer_logits(model.decoder[-1], hidden, precision))
    start = time.perf_counter()
    with patched((count_model, "_random_bytes", inner.wrap("random bytes", count_model._random_bytes)),
                 (count_model, "_fine_uniforms", inner.wrap("inverse CDF / Gamma-Poisson",
                                                            count_model._fine_uniforms)),
                 (count_model, "_inverse_cdf_draws", inner.wrap("inverse CDF / Gamma-Poisson",
                                                                count_model._inverse_cdf_draws)),
                 (count_model, "_csr", inner.wrap("CSR", count_model._csr))):
        counts = count_model.sample_negative_binomial_screened(block_logits, totals, theta, generator)
    clock.add(SCREEN_REST, time.perf_counter() - start - sum(measured.values()))
    for name, seconds in measured.items():
        clock.add(name, seconds)
    return counts


# ---- the dense count draws (the path before the screened draws) -----------------------------------
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

    This is the dense form (a float32 uniform for every entry; measured and replaced):
    :func:`VAE.count_model.sample_negative_binomial_screened` draws the same distribution with a byte per
    entry and is what :meth:`VAE.VAE_model.VAE.sample_counts` uses.
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


@torch.inference_mode()
def _refuse_labels(model):
    if model.reads_labels:
        raise ValueError("the timed and dense count draws time a decoder that reads no labels")


def sample_counts_dense(model, latent, totals, generator, precision="fp32", labels=None):
    """What ``VAE.sample_counts(method="dense")`` drew: the whole mean matrix, a float32 uniform per entry (a
    decoder that reads no labels: the baselines predate them)."""
    _refuse_labels(model)
    if precision != "fp32":
        raise ValueError("precision bf16 applies to the screened draws; the dense path decodes in fp32")
    theta = torch.exp(model.log_theta.float())
    shares = model._in_eval_mode(lambda z: torch.softmax(model.decoder(z).float(), dim=1), latent)
    return sample_negative_binomial(shares * totals[:, None], theta, generator)


# ---- write_decoded_h5ad's variants and stage times ------------------------------------------------
class _CopiedPattern(writer.StreamedCsrMatrix):
    """X's indices and indptr stored as copies of the counts' (the layout before the shared pattern)."""

    def __init__(self, *args, pattern_of=None, **kwargs):
        super().__init__(*args, **kwargs)


@contextlib.contextmanager
def writer_variant(count_draws="screened", share_pattern=True, timings=None):
    """``write_decoded_h5ad`` inside the block: ``count_draws`` ``dense`` draws by :func:`sample_counts_dense`
    (same distribution, other random numbers), ``share_pattern`` False stores X's indices and indptr as copies
    (same values); ``timings``, a dict, gets seconds per stage (``decode`` / ``decode and draw``,
    ``normalize``, ``write`` (on the writer thread), ``annotations``, ``sync and rename``) and, with screened
    draws, their sub-steps as ``draw: <sub-step>``."""
    if count_draws not in ("screened", "dense"):
        raise ValueError(f"count_draws must be 'screened' or 'dense', not {count_draws!r}")
    clock = SubStepClock(timings)
    sub_steps = {}
    if count_draws == "dense":
        draw = sample_counts_dense
    elif timings is not None:
        def draw(model, latent, totals, generator, precision="fp32", labels=None):
            _refuse_labels(model)
            return timed_sample_counts(model, latent, totals, generator, sub_steps, precision)
    else:
        draw = VAE.sample_counts
    replacements = [(VAE, "sample_counts", draw)]
    if not share_pattern:
        replacements.append((writer, "StreamedCsrMatrix", _CopiedPattern))
    if timings is not None:
        replacements += [(writer, "_decode_mean", clock.wrap("decode", writer._decode_mean)),
                         (writer, "_draw_counts", clock.wrap("decode and draw", writer._draw_counts)),
                         (writer, "log_normalize_counts", clock.wrap("normalize", writer.log_normalize_counts)),
                         (writer, "_write_annotations", clock.wrap("annotations", writer._write_annotations)),
                         (writer, "atomic_output", _timed_exit(writer.atomic_output, clock, "sync and rename")),
                         (writer.StreamedCsrMatrix, "append",
                          clock.wrap("write", writer.StreamedCsrMatrix.append))]
    with patched(*replacements):
        yield
    for name, seconds in sub_steps.items():
        clock.add(f"draw: {name}", seconds)


def _timed_exit(context_manager, clock, name):
    """``context_manager`` with the seconds of its exit (after the block) added to ``name``."""
    @contextlib.contextmanager
    def timed(*args, **kwargs):
        manager = context_manager(*args, **kwargs)
        value = manager.__enter__()
        try:
            yield value
        except BaseException:
            if not manager.__exit__(*sys.exc_info()):
                raise
        else:
            with clock(name):
                manager.__exit__(None, None, None)
    return timed


# ---- the diffusion training step before (frozen) and the candidates measured, not adopted ----------
class TodayConditionScales:
    """Today's condition projections: ``unique(dim=0)``, then one matmul and one gather per block."""

    def __init__(self, model, cond, gather=True):
        if gather:
            unique_cond, index = torch.unique(cond, dim=0, return_inverse=True)
        else:
            unique_cond, index = cond, None
        c_emb = model.embed_condition(unique_cond)
        self.batch_size = cond.shape[0]
        self._scales = {id(block): block.cond_proj(c_emb) if index is None else block.cond_proj(c_emb)[index]
                        for block in list(model.encoder) + list(model.decoder)}

    def __call__(self, block):
        return self._scales[id(block)]


class TodayTimeShifts:
    """Today's time shifts: one matmul and one gather per block."""

    def __init__(self, model, t, gather=True):
        if gather and t.numel() > 0 and bool((t == t[0]).all()):
            unique_t, self.index = t[:1], None
        elif gather:
            unique_t, self.index = torch.unique(t, return_inverse=True)
        else:
            unique_t, self.index = t, None
        self.t_emb = model.embed_time(unique_t)

    def __call__(self, block):
        shift = block.time_proj(self.t_emb)
        return shift if self.index is None else shift[self.index]


@contextlib.contextmanager
def todays_projections(enabled=True):
    """CellUNet.forward builds today's per-block projections inside this context."""
    saved = cell_model.ConditionScales, cell_model.TimeShifts
    if enabled:
        cell_model.ConditionScales, cell_model.TimeShifts = TodayConditionScales, TodayTimeShifts
    try:
        yield
    finally:
        cell_model.ConditionScales, cell_model.TimeShifts = saved


class TodayTrainer(DiffusionTrainer):
    """Today's step: per-block projections and the EMA updated one tensor at a time."""

    def run_step(self):
        with todays_projections():
            return super().run_step()

    @torch.no_grad()
    def _update_ema(self):
        from guided_diffusion.training.trainer import ema_warmup_rate

        rate = ema_warmup_rate(self.ema_rate, self.step)
        for ema_param, param in zip(self.ema_model.parameters(), self.model.parameters()):
            ema_param.mul_(rate).add_(param.detach(), alpha=1.0 - rate)
        for ema_buffer, buffer in zip(self.ema_model.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)


class OneCastForward:
    """The denoiser with every Linear's weight and bias in bf16 from one concatenation and one cast per call
    (``torch.func.functional_call`` with bf16 views): autocast finds them in bf16 and casts only the inputs.
    Rounding is the same as autocast's per-layer cast, so outputs and gradients are identical."""

    def __init__(self, model):
        self.model = model
        linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        self.names = [f"{name}.{part}" for name, module in linears
                      for part, _ in module.named_parameters(recurse=False)]
        parameters = dict(model.named_parameters())
        self.parameters = [parameters[name] for name in self.names]
        self.sizes = [p.numel() for p in self.parameters]

    def __call__(self, *args, **kwargs):
        flat = torch.cat([p.reshape(-1) for p in self.parameters]).to(torch.bfloat16)
        pieces = flat.split(self.sizes)
        weights = {name: piece.view(p.shape) for name, piece, p in zip(self.names, pieces, self.parameters)}
        return torch.func.functional_call(self.model, weights, args, kwargs, strict=False)


class OneCastTrainer(DiffusionTrainer):
    """(Measured, not adopted.) The adopted step with the Linear weights cast once per step (OneCastForward)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replica = OneCastForward(self.model)


class ForwardBackwardOnly(DiffusionTrainer):
    """(A bound, not a training step.) The adopted step without the optimizer update and the EMA."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer.step = lambda closure=None: None

    def _update_ema(self):
        pass
