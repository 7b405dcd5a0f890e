"""The sampler's side of a checkpoint: the denoiser rebuilt from a checked :class:`DiffusionCheckpoint`
(EMA weights by default) and the autoencoder it was trained with, found and verified by its sha256."""
import os

from VAE.VAE_model import load_autoencoder

from .cell_model import CellUNet
from .checkpoint import file_sha256
from .cli import UsageError
from .data import check_genes
from .diffusion_checkpoint import DiffusionCheckpoint
from .train_util import ema_file


class LoadedModel:
    """A diffusion checkpoint turned back into a model plus the record it carries."""

    def __init__(self, model, checkpoint, path, weights):
        self.model = model
        self.checkpoint = checkpoint
        self.path = path
        self.weights = weights  # "ema" or "raw"

    @property
    def label_keys(self):
        return list(self.checkpoint.label_keys)

    @property
    def vocabularies(self):
        return self.checkpoint.vocabularies


def load_diffusion_model(path, use_ema=True, device="cpu"):
    """Rebuild the denoiser from ``model{step}.pt`` (EMA sibling by default) or an ``ema_*.pt`` file."""
    checkpoint = DiffusionCheckpoint.load(path)
    weights = "ema" if checkpoint.kind == "diffusion_ema" else "raw"
    if checkpoint.kind == "diffusion_model" and use_ema:
        sibling = ema_file(os.path.dirname(path), checkpoint.ema_rate, checkpoint.step)
        if not os.path.exists(sibling):
            raise UsageError(f"the EMA weights {sibling} next to {path} are missing; "
                             f"pass --use_ema False to sample the raw weights")
        checkpoint = DiffusionCheckpoint.load(sibling, kinds=("diffusion_ema",))
        weights = "ema"
    try:
        model = CellUNet(**checkpoint.model_config)
        model.load_state_dict(checkpoint.state_dict)
    except (TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{path}: the weights do not fit the recorded model config ({first_line}); the file "
                         f"was edited or is corrupt") from None
    model.to(device).eval()
    return LoadedModel(model, checkpoint, path, weights)


def autoencoder_candidates(loaded):
    """Where the autoencoder may be: the recorded path, the recorded path relative to the model, and a file
    of the recorded name beside the model (a model folder moved together with its autoencoder)."""
    folder = os.path.dirname(os.path.abspath(loaded.path))
    checkpoint = loaded.checkpoint
    paths = [checkpoint.vae_path, os.path.join(folder, checkpoint.vae_path_from_model),
             os.path.join(folder, checkpoint.vae_file_name)]
    return list(dict.fromkeys(p for p in paths if p))


def resolve_autoencoder(loaded, vae_path, device):
    """Find the autoencoder (flag, or the first recorded candidate with the recorded hash) and check it."""
    candidates = [vae_path] if vae_path else autoencoder_candidates(loaded)
    existing = [p for p in candidates if os.path.isfile(p)]
    if not existing:
        raise UsageError(f"autoencoder not found at {' or '.join(candidates)}; pass --vae_path")
    found = next((p for p in existing if file_sha256(p) == loaded.checkpoint.vae_sha256), None)
    if found is None:
        raise UsageError(f"the autoencoder {existing[0]} is not the one this model was trained with "
                         f"(sha256 differs); pass the right --vae_path")
    autoencoder, _ = load_autoencoder(found, device=device)
    check_genes(loaded.checkpoint.genes, autoencoder.genes, what=f"the diffusion model {loaded.path}")
    return autoencoder
