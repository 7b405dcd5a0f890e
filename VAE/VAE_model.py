"""The gene-expression autoencoder: all genes -> L2-normalized latent -> all genes.

An MLP encoder genes -> hidden layers -> latent with BatchNorm + PReLU (dropout configurable), the latent
L2-normalized (``latent_norm="sphere"``, the original) or left as the encoder's linear output (``"none"``); the
decoder mirrored. The default is one hidden layer of 128 and a 20-d latent
(``hidden_dims=(128,)``, ``latent_dim=20``): on held-out cells its decoded cells are much closer to real ones than
those of the cfDiffusion paper's architecture (``hidden_dims=(1024, 1024, 1024)``, ``latent_dim=128``), which
memorizes the training cells within a few epochs (docs/fidelity.md). The encoder always reads log-normalized
expression. Two decoders (``loss_ae``):

* ``mse`` (the original): the decoder outputs log-normalized expression (optional ReLU), trained
  with mean squared error; decoding gives smooth expression.
* ``nb``: the decoder outputs each gene's share of the cell's counts (softmax over genes) and the
  model learns a per-gene negative-binomial dispersion; trained by the negative-binomial likelihood
  of the raw counts (mean = share x the cell's total counts). Decoding can then draw counts, so
  generated cells carry the sampling noise and sparsity of real ones (:meth:`VAE.sample_counts`).

By default :class:`VAE` is a deterministic autoencoder (no sampled latent, no KL term), as in the original
project; :data:`DeterministicAutoencoder` names the same class. With ``variational=True`` it is a variational
autoencoder: the encoder also gives a log-variance per latent coordinate, training decodes a latent drawn from
that Gaussian posterior and adds its KL divergence from N(0, I) to the loss (:meth:`VAE.kl_divergence`, weighted by
the training's ``kl_weight``), and the latent is the posterior mean, not L2-normalized (the diffusion model is
trained on posterior means). The count
model (likelihood and count draws) is in :mod:`VAE.count_model`. :class:`Autoencoder` wraps a trained
network with the input space it was trained on.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import Normalization, check_genes
from guided_diffusion.data.labels import format_values

from VAE import count_model
from VAE.autoencoder_checkpoint import AutoencoderCheckpoint
from VAE.count_model import negative_binomial_nll, negative_binomial_nll_per_gene

DECODER_ACTIVATIONS = ("ReLU", "linear")
LOSSES = ("mse", "nb")
LATENT_NORMS = ("sphere", "none")  # the deterministic latent: L2-normalized (the original) or the encoder's output
# the settings a checkpoint written before they existed was trained with (its model_config lacks them)
CONFIG_DEFAULTS = {"variational": False, "latent_norm": "sphere", "decoder_label_keys": [], "decoder_labels": [],
                   "encoder_genes": []}


def _mlp_block(in_features, out_features, dropout):
    layers = [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.PReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


class VAE(nn.Module):
    """The deterministic autoencoder network: ``encode`` maps log-normalized expression to an L2-normalized
    latent, ``decode`` maps a latent back to mean expression; no latent is sampled and there is no KL term.

    The name VAE is the original project's (checkpoints and callers use it);
    :data:`DeterministicAutoencoder` is the same class. :class:`Autoencoder` wraps a trained one."""

    def __init__(self, num_genes, latent_dim=20, hidden_dims=(128,), dropout=0.0,
                 decoder_activation="ReLU", loss_ae="mse", target_sum=1e4, variational=False, latent_norm="sphere",
                 decoder_label_keys=(), decoder_labels=(), encoder_genes=()):
        super().__init__()
        if len(decoder_label_keys) != len(decoder_labels) or any(not values for values in decoder_labels):
            raise UsageError("--decoder_label_key: every key the decoder reads needs its label values")
        if len(set(decoder_label_keys)) != len(decoder_label_keys):
            raise UsageError(f"--decoder_label_key names a key twice: {', '.join(decoder_label_keys)}")
        encoder_genes = [int(gene) for gene in encoder_genes]
        if encoder_genes and (len(set(encoder_genes)) != len(encoder_genes) or min(encoder_genes) < 0
                              or max(encoder_genes) >= num_genes):
            raise UsageError(f"--encoder_genes: the encoder's genes must be distinct positions among the "
                             f"{num_genes} genes")
        if latent_norm not in LATENT_NORMS:
            raise UsageError(f"--latent_norm must be one of {', '.join(LATENT_NORMS)}, got {latent_norm!r}")
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
        self.variational = bool(variational)
        self.latent_norm = latent_norm  # the deterministic latent's; a variational latent is the posterior mean
        self.decoder_label_keys = [str(key) for key in decoder_label_keys]
        self.decoder_labels = [[str(label) for label in values] for values in decoder_labels]
        # the positions of the genes the encoder reads (sorted; empty: every gene); the decoder outputs every gene
        self.encoder_genes = sorted(encoder_genes)
        if self.encoder_genes:
            self.register_buffer("_encoder_index", torch.tensor(self.encoder_genes, dtype=torch.long),
                                 persistent=False)

        encoder, width = [], len(self.encoder_genes) or self.num_genes
        for hidden in self.hidden_dims:
            encoder += _mlp_block(width, hidden, self.dropout)
            width = hidden
        encoder.append(nn.Linear(width, self.latent_dim))
        self.encoder = nn.Sequential(*encoder)
        if self.variational:  # the posterior's log-variance, from the same features as its mean
            self.encoder_log_var = nn.Linear(width, self.latent_dim)
        self.kl_per_cell = None  # of the last forward, variational only (see forward)

        decoder, width = [], self.latent_dim
        for hidden in reversed(self.hidden_dims):
            decoder += _mlp_block(width, hidden, self.dropout)
            width = hidden
        decoder.append(nn.Linear(width, self.num_genes))
        if self.decoder_activation == "ReLU":
            decoder.append(nn.ReLU())
        self.decoder = nn.Sequential(*decoder)
        if self.decoder_labels:  # a learned shift per label of every key added to every Linear's output, zero at first
            widths = [m.out_features for m in self.decoder if isinstance(m, nn.Linear)]
            sizes = [len(values) for values in self.decoder_labels]
            # one table per layer holds every key's labels, key after key: a cell's shift sums its keys' rows
            self.decoder_label_effects = nn.ModuleList(nn.Embedding(sum(sizes), w) for w in widths)
            for effect in self.decoder_label_effects:
                nn.init.zeros_(effect.weight)
            self.register_buffer("_label_offsets", torch.tensor(np.cumsum([0] + sizes[:-1]), dtype=torch.long),
                                 persistent=False)
        if loss_ae == "nb":
            self.log_theta = nn.Parameter(torch.zeros(self.num_genes))  # per-gene inverse dispersion
        self.precision = "fp32"  # of the forward's matmuls; a run setting, not part of config()

    @property
    def latent_on_sphere(self):
        """Whether every encoded latent has norm 1 (the deterministic encoder with ``latent_norm`` "sphere")."""
        return not self.variational and self.latent_norm == "sphere"

    @property
    def reads_labels(self):
        """Whether the decoder reads each cell's labels (``decoder_label_keys``) beside its latent."""
        return bool(self.decoder_label_keys)

    def _label_codes(self, labels, n_cells, device):
        """``labels`` (integer codes, cells x keys: column k indexes ``decoder_labels[k]``; a vector for a single
        key) as rows of the effect tables, checked; None for a decoder that reads no labels."""
        if not self.reads_labels:
            return None
        keys = self.decoder_label_keys
        if labels is None:
            raise UsageError(f"this autoencoder's decoder reads each cell's {', '.join(keys)} label beside its "
                             f"latent; give the labels of the latents to decode")
        codes = torch.as_tensor(labels, dtype=torch.long, device=device)
        if codes.dim() == 1 and len(keys) == 1:
            codes = codes[:, None]
        if codes.dim() != 2 or codes.shape != (n_cells, len(keys)):
            raise UsageError(f"labels of shape {tuple(codes.shape)} for {n_cells} latents and {len(keys)} label "
                             f"key(s) to decode")
        for column, (key, values) in enumerate(zip(keys, self.decoder_labels)):
            if n_cells and (int(codes[:, column].min()) < 0 or int(codes[:, column].max()) >= len(values)):
                raise UsageError(f"label codes must lie in 0..{len(values) - 1} (the autoencoder's {key!r} values)")
        return codes + self._label_offsets.to(device)

    def _label_shift(self, effect, codes, dtype):
        return effect(codes).sum(dim=1).to(dtype)

    def run_decoder(self, latent, labels=None, stop=None):
        """The decoder's layers ``[:stop]`` on ``latent`` (all: its output), each Linear's output shifted by the
        labels' learned effects when the decoder reads labels (``labels``: codes, cells x keys)."""
        codes = self._label_codes(labels, len(latent), latent.device)
        modules = list(self.decoder)[:stop]
        if codes is None:
            return nn.Sequential(*modules)(latent) if stop is not None else self.decoder(latent)
        effects, x = iter(self.decoder_label_effects), latent
        for module in modules:
            x = module(x)
            if isinstance(module, nn.Linear):
                x = x + self._label_shift(next(effects), codes, x.dtype)
        return x

    def codes_of(self, key, values):
        """The codes into ``decoder_labels`` of the decoder's label key ``key`` of label values (strings); a value
        the autoencoder was not trained on is a one-line error."""
        known = self.decoder_labels[self.decoder_label_keys.index(key)]
        lookup = {label: code for code, label in enumerate(known)}
        values = [str(value) for value in values]
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise UsageError(f"this autoencoder was trained on other {key!r} values than "
                             f"{format_values(unknown)}; its values: {format_values(known)}")
        return np.array([lookup[value] for value in values], dtype=np.int64)

    def output_label_effect(self, codes):
        """The labels' shift of the output layer (cells x genes) for ``codes`` as :meth:`_label_codes` returns
        them; None for a decoder that reads no labels."""
        if not self.reads_labels:
            return None
        return self._label_shift(self.decoder_label_effects[-1], codes, torch.float32)

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
                "target_sum": self.target_sum, "variational": self.variational, "latent_norm": self.latent_norm,
                "decoder_label_keys": list(self.decoder_label_keys),
                "decoder_labels": [list(values) for values in self.decoder_labels],
                "encoder_genes": list(self.encoder_genes)}

    @staticmethod
    def complete_config(config):
        """A recorded model config with the settings it predates filled in (their values before they existed); a
        single-key record (``decoder_label_key`` and its values) read as the list of keys it is."""
        config = dict(config)
        if "decoder_label_key" in config:
            key, values = config.pop("decoder_label_key"), config.pop("decoder_labels", [])
            config["decoder_label_keys"], config["decoder_labels"] = ([key], [values]) if key else ([], [])
        return {**CONFIG_DEFAULTS, **config}

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

    def posterior(self, x):
        """(latent, log-variance): the latent (L2-normalized with ``latent_norm`` "sphere") and None
        (deterministic), or the Gaussian posterior's mean and log-variance (variational), float32."""
        if self.encoder_genes:
            x = x.index_select(1, self._encoder_index)
        with self._matmul_precision(x):
            if not self.variational:
                latent = self.encoder(x).float()
                return (F.normalize(latent, dim=1) if self.latent_norm == "sphere" else latent), None
            features = self.encoder[:-1](x)
            mean, log_var = self.encoder[-1](features), self.encoder_log_var(features)
        return mean.float(), log_var.float().clamp(-20.0, 10.0)

    def embed(self, x):
        return self.posterior(x)[0]

    @staticmethod
    def kl_divergence(mean, log_var):
        """KL(N(mean, exp(log_var)) || N(0, I)) per cell, summed over latent coordinates."""
        return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(dim=1)

    def forward(self, x, latent_noise=0.0, labels=None):
        """(decoder output, latent): log-normalized expression (mse) or per-gene logits (nb), float32.

        ``latent_noise`` (train mode only): the decoder reads the latent plus Gaussian noise of this
        standard deviation per coordinate, so it learns to decode the neighbourhood of each training cell's
        latent, not only the point (the returned latent is the encoder's, without noise). A variational model
        decodes, in train mode, a latent drawn from its posterior, and keeps each cell's KL divergence in
        ``kl_per_cell`` (the training loss adds it; eval mode decodes the posterior mean). ``labels``: each cell's
        code into ``decoder_labels``, for a decoder that reads them."""
        latent, log_var = self.posterior(x)
        decoded = latent
        if self.variational:
            self.kl_per_cell = self.kl_divergence(latent, log_var)
            if self.training:
                decoded = latent + torch.exp(0.5 * log_var) * torch.randn_like(latent)
        if latent_noise and self.training:
            decoded = decoded + latent_noise * torch.randn_like(latent)
        with self._matmul_precision(decoded):
            output = self.run_decoder(decoded, labels)
        return output.float(), latent

    def reconstruction_loss(self, output, x, counts=None, totals=None, gene_weights=None):
        """Mean squared error on log-normalized ``x`` (mse), or the negative-binomial negative
        log-likelihood of the raw ``counts`` given each cell's ``totals``, averaged over entries (nb).
        ``gene_weights`` (nb; one per gene, mean 1): each gene's terms weighted by it."""
        if self.loss_ae == "mse":
            return F.mse_loss(output, x)
        log_mean = F.log_softmax(output, dim=1) + torch.log(totals)[:, None]
        if gene_weights is None:
            return negative_binomial_nll(log_mean, self.log_theta, counts)
        per_gene = negative_binomial_nll_per_gene(log_mean, self.log_theta, counts)
        return (per_gene * gene_weights).sum() / per_gene.numel()

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
    def decode(self, latent, labels=None):
        """Mean log-normalized expression from latents (nb: log1p of the expected share x target_sum),
        computed in eval mode (train mode is restored); ``labels`` (codes) for a decoder that reads them."""
        return self._in_eval_mode(lambda z: self._mean_expression(self.run_decoder(z, labels)), latent)

    @torch.inference_mode()
    def sample_counts(self, latent, totals, generator, precision="fp32", labels=None):
        """Raw counts drawn from the decoded negative binomial: mean = share x ``totals`` (one per cell);
        a sparse CSR tensor (cells x genes); ``precision`` fp32 or bf16 (the output layer's); ``labels`` (codes)
        for a decoder that reads them. See :func:`VAE.count_model.sample_counts`."""
        return count_model.sample_counts(self, latent, totals, generator, precision, labels)


DeterministicAutoencoder = VAE


class Autoencoder:
    """Wrapper of a trained :class:`VAE` (a deterministic autoencoder) with the input space it was trained on
    (genes, normalization) and the checkpoint path: what the diffusion model and the sampler use to encode
    datasets and decode latents (``.model`` is the network)."""

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

    def check_conditions(self, dataset):
        """For a decoder that reads labels: refuse a diffusion dataset not conditioned on every label key it reads,
        or with values the autoencoder was not trained on (the sampler could not decode their cells)."""
        model = self.model
        for key in model.decoder_label_keys:
            if key not in dataset.label_keys:
                raise UsageError(f"the autoencoder {self.path} decodes each cell with its {key!r} label; condition "
                                 f"the diffusion model on it (--label_key {key}; now: "
                                 f"{', '.join(dataset.label_keys) or 'no label key'})")
            model.codes_of(key, dataset.vocabularies[key])

    def decoder_codes(self, obs):
        """The codes (cells x keys) of ``obs``'s columns of the decoder's label keys into its labels (None for a
        decoder that reads no labels); a value the autoencoder was not trained on, or a missing column, is a
        one-line error."""
        model = self.model
        if not model.reads_labels:
            return None
        columns = []
        for key in model.decoder_label_keys:
            if obs is None or key not in obs.columns:
                raise UsageError(f"the autoencoder {self.path} decodes each cell with its {key!r} label, but the "
                                 f"cells to decode have no {key!r} column; condition the diffusion model on "
                                 f"--label_key {key}")
            columns.append(model.codes_of(key, obs[key].astype(str).to_numpy()))
        return np.stack(columns, axis=1)

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
    model = VAE(**VAE.complete_config(checkpoint.model_config))
    model.load_state_dict(checkpoint.state_dict)
    model.to(device).eval()
    return Autoencoder(model, checkpoint.genes, Normalization.from_dict(checkpoint.normalization), path), checkpoint
