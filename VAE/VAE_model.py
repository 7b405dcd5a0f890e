"""The gene-expression autoencoder: all genes -> 128-d L2-normalized latent -> all genes.

Architecture of the cfDiffusion paper: encoder MLP genes -> 1024 -> 1024 -> 1024 -> latent with
BatchNorm + PReLU (dropout configurable), the latent L2-normalized; decoder mirrored, with an
optional ReLU on the output (log-normalized expression is non-negative). Loss: MSE.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.cli import UsageError
from guided_diffusion.data import Normalization

DECODER_ACTIVATIONS = ("ReLU", "linear")


def _mlp_block(in_features, out_features, dropout):
    layers = [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.PReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


class VAE(nn.Module):
    """Deterministic autoencoder (named VAE as in the original project)."""

    def __init__(self, num_genes, latent_dim=128, hidden_dims=(1024, 1024, 1024), dropout=0.0,
                 decoder_activation="ReLU"):
        super().__init__()
        if decoder_activation not in DECODER_ACTIVATIONS:
            raise UsageError(f"--decoder_activation must be one of {', '.join(DECODER_ACTIVATIONS)}, "
                             f"got {decoder_activation!r}")
        self.num_genes = int(num_genes)
        self.latent_dim = int(latent_dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.dropout = float(dropout)
        self.decoder_activation = decoder_activation

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
        if decoder_activation == "ReLU":
            decoder.append(nn.ReLU())
        self.decoder = nn.Sequential(*decoder)

    def init_output_bias(self, gene_means):
        """Start the decoder's output at each gene's mean expression.

        Without it the ReLU output starts at zero for most genes and lowly expressed genes are never
        learned in a short run (their reconstruction stays exactly 0).
        """
        output = [m for m in self.decoder if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            output.bias.copy_(torch.as_tensor(gene_means, dtype=output.bias.dtype))

    def config(self):
        return {"num_genes": self.num_genes, "latent_dim": self.latent_dim, "hidden_dims": list(self.hidden_dims),
                "dropout": self.dropout, "decoder_activation": self.decoder_activation}

    def embed(self, x):
        return F.normalize(self.encoder(x), dim=1)

    def forward(self, x):
        latent = self.embed(x)
        return self.decoder(latent), latent

    def loss(self, x):
        reconstruction, _ = self(x)
        return F.mse_loss(reconstruction, x)

    @torch.inference_mode()
    def encode(self, x):
        """Latents of log-normalized expression, computed in eval mode (train mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            return self.embed(x)
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def decode(self, latent):
        """Log-normalized expression from latents, computed in eval mode (train mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            return self.decoder(latent)
        finally:
            self.train(was_training)


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
    """Rebuild the autoencoder from its checkpoint alone (weights + config + genes + normalization)."""
    payload = load_checkpoint(path, kinds=("autoencoder",))
    model = VAE(**payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return Autoencoder(model, payload["genes"], Normalization.from_dict(payload["normalization"]), path), payload
