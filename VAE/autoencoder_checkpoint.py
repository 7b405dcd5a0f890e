"""The autoencoder's checkpoint files, saved and loaded here only.

``model_seed={seed}_step={step}.pt`` (kind ``autoencoder``): weights, model config, genes, normalization,
step, seed, validation fraction, the run's settings (``train_config``) and the fingerprint of the training
data (``data_fingerprint``, with ``data_changes`` listing resumes on new data); everything needed to use the
model. ``opt_seed={seed}_step={step}.pt`` beside it (kind ``autoencoder_optimizer``): what only resuming
needs (AdamW moments, data order, RNG states; with ``--ema_rate`` the running weights, whose average the model
file holds); both are written to temporaries and renamed
only when both were written (the model file last), so a model file marks a complete set and a failed save
(a full disk) leaves neither.
Files written before the split (format_version 1 with the optimizer inside the model file) still load
and resume exactly: :meth:`AutoencoderCheckpoint.load` reads that layout too.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from guided_diffusion.core.container import latest_checkpoint, load_checkpoint, save_checkpoint_set

MODEL_PATTERN = r"model_seed=(-?\d+)_step=(\d+)\.pt"
OPTIMIZER_PATTERN = r"opt_seed=(-?\d+)_step=(\d+)\.pt"
BEST_PATTERN = r"model_seed=(-?\d+)_best\.pt"
RESUME_KEYS = ("optimizer", "sampler", "rng")


def model_path(save_dir, seed, step):
    return os.path.join(save_dir, f"model_seed={seed}_step={step}.pt")


def best_model_path(save_dir, seed):
    """``model_seed={seed}_best.pt``: the weights of the lowest validation loss (early stopping)."""
    return os.path.join(save_dir, f"model_seed={seed}_best.pt")


def optimizer_path_for(path):
    """``opt_seed=S_step=N.pt`` beside ``model_seed=S_step=N.pt``."""
    folder, name = os.path.split(path)
    return os.path.join(folder, "opt_" + name[len("model_"):]) if name.startswith("model_") else None


def checkpoint_files(folder):
    """Names of the autoencoder checkpoint files (model and optimizer, any seed) in ``folder``."""
    if not os.path.isdir(folder):
        return []
    return [name for name in os.listdir(folder)
            if any(re.fullmatch(pattern, name) for pattern in (MODEL_PATTERN, OPTIMIZER_PATTERN, BEST_PATTERN))]


def latest_model_path(folder, seed):
    """The newest ``model_seed={seed}_step=*.pt`` in ``folder``, or None."""
    return latest_checkpoint(folder, rf"model_seed={seed}_step=(\d+)\.pt")


@dataclass
class AutoencoderCheckpoint:
    """One saved autoencoder; ``training_state`` (optimizer, sampler, rng and, with early stopping, the
    best validation loss so far) is None for a weights-only file. ``selection`` (best-weights files only)
    records how the weights were chosen: validation loss, its step, the patience and the run's last step."""

    model_config: dict
    state_dict: dict
    genes: list
    normalization: dict
    step: int
    seed: int = 0
    val_fraction: float = 0.1
    train_config: dict = field(default_factory=dict)
    training_state: Optional[dict] = None
    selection: Optional[dict] = None
    data_fingerprint: Optional[dict] = None  # the training data's (guided_diffusion.data.fingerprint); None before
    data_changes: list = field(default_factory=list)  # resumes on new data (--resume_on_new_data True)
    # --refit_dispersion: how the per-gene dispersion was refitted, with the learned one it replaced
    dispersion_fit: Optional[dict] = None
    path: str = ""

    def save(self, path):
        """Write the optimizer file (when there is training state), then the model file; returns ``path``."""
        optimizer_path = optimizer_path_for(path)
        files = []
        if self.training_state is not None and optimizer_path:
            files.append(({**self.training_state, "step": self.step}, optimizer_path, "autoencoder_optimizer"))
        payload = {"model_config": self.model_config, "state_dict": self.state_dict, "step": self.step,
                   "genes": self.genes, "normalization": self.normalization,
                   "train_config": self.train_config, "val_fraction": self.val_fraction, "seed": self.seed,
                   "data_changes": list(self.data_changes)}
        if self.data_fingerprint is not None:
            payload["data_fingerprint"] = self.data_fingerprint
        if self.selection is not None:
            payload["selection"] = self.selection
        if self.dispersion_fit is not None:
            payload["dispersion_fit"] = self.dispersion_fit
        # one set: both written to temporaries, then renamed (the model file last); a failure leaves neither
        save_checkpoint_set(files + [(payload, path, "autoencoder")])
        self.path = path
        return path

    @classmethod
    def load(cls, path, with_training_state=False):
        """Read a model file (either layout); with ``with_training_state`` also its optimizer state, from
        the ``opt_`` file beside it or, for the old layout, from the model file itself."""
        payload = load_checkpoint(path, kinds=("autoencoder",))
        state = None
        if with_training_state:
            if all(key in payload for key in RESUME_KEYS):  # format 1 before the split: all in one file
                state = {key: payload[key] for key in RESUME_KEYS}
            elif optimizer_path_for(path) and os.path.exists(optimizer_path_for(path)):
                stored = load_checkpoint(optimizer_path_for(path), kinds=("autoencoder_optimizer",))
                state = {key: stored[key] for key in RESUME_KEYS}
                for optional in ("early_stopping", "running_weights"):  # with early stopping / ema_rate
                    if optional in stored:
                        state[optional] = stored[optional]
        return cls(model_config=payload["model_config"], state_dict=payload["state_dict"],
                   genes=list(payload["genes"]), normalization=payload["normalization"],
                   step=int(payload["step"]), seed=int(payload.get("seed", 0)),
                   val_fraction=float(payload.get("val_fraction", 0.1)),
                   train_config=dict(payload.get("train_config", {})), training_state=state,
                   selection=payload.get("selection"), data_fingerprint=payload.get("data_fingerprint"),
                   data_changes=list(payload.get("data_changes") or []),
                   dispersion_fit=payload.get("dispersion_fit"), path=path)
