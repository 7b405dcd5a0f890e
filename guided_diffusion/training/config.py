"""The settings of a training run as small dataclasses (data, model, training), not an argparse Namespace.

Each training CLI turns its flags into these with :func:`from_flags` and makes one library call. The
library refers to settings by their field names; :class:`SettingError` carries the field, and the CLI
words it as the flag that sets it (:func:`flag_of`), so a library caller sees ``num_genes ...`` and a
command-line user ``--num_genes ...``.

Each dataclass's ``validate()`` checks its fields as the flags' types do (typed: a string is not a number
or a boolean, a boolean not a number; :mod:`guided_diffusion.core.checks`); the training functions run
:func:`validate` first, so the CLIs and the Python API share one set of checks and messages.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

from guided_diffusion.core.checks import (check_bool, check_float, check_int, check_int_list, check_path, check_str,
                                          check_str_list, is_number)
from guided_diffusion.core.errors import SettingError, literal

PRECISION_CHOICES = ("auto", "fp32", "bf16")


def from_flags(cls, args, **overrides):
    """An instance of the dataclass ``cls`` from the parsed flags with the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def defaults_of(*classes):
    """{setting: default} of the config dataclasses ``classes`` (the CLIs build their flags' defaults from it,
    so a default is stated once, here)."""
    values = {}
    for cls in classes:
        for item in dataclasses.fields(cls):
            if item.default is not dataclasses.MISSING:
                values[item.name] = item.default
            elif item.default_factory is not dataclasses.MISSING:
                values[item.name] = item.default_factory()
    return values


def plain_dict(*configs):
    """The settings of ``configs`` merged into one flat dict of plain values (for checkpoints)."""
    merged = {}
    for config in configs:
        for key, value in dataclasses.asdict(config).items():
            if isinstance(value, (int, float, str, bool, list, type(None))):
                merged[key] = list(value) if isinstance(value, (list, tuple)) else value
    return merged


def validate(*configs):
    """Check every field of ``configs`` (each a dataclass of this module with a ``validate`` method) as the
    command-line flags' types do; the library's training functions run it, for the CLIs and the API alike."""
    for config in configs:
        config.validate()


def _check_training_common(config):
    check_path(config.save_dir, "save_dir")
    check_int(config.batch_size, "batch_size", 1)
    check_float(config.lr, "lr", 0, low_open=True)
    check_float(config.weight_decay, "weight_decay", 0)
    check_float(config.max_minutes, "max_minutes", 0, low_open=True, optional=True)
    check_int(config.seed, "seed", 0)
    check_int(config.log_interval, "log_interval", 1)
    check_str(config.precision, "precision", PRECISION_CHOICES)
    check_str(config.device, "device")
    check_bool(config.overwrite, "overwrite")
    check_bool(config.progress, "progress")


@dataclass
class DataConfig:
    """Which cells are read and how (the loader's flags)."""

    data_dir: str
    label_key: Optional[List[str]] = None
    layer: str = ""
    input_is_log: bool = False
    filter: List[str] = field(default_factory=list)
    backed: object = "auto"
    block_rows: int = 4096
    allow_count_like_log: bool = False

    def validate(self):
        if not isinstance(self.data_dir, (str, os.PathLike)) and not is_anndata(self.data_dir):
            raise SettingError(f"{{data_dir}} must be an .h5ad path or an AnnData, got "
                               f"{literal(type(self.data_dir).__name__)}", "data_dir")
        check_str_list(self.label_key, "label_key", optional=True)
        check_str(self.layer, "layer")
        check_bool(self.input_is_log, "input_is_log")
        check_str_list(self.filter, "filter")
        if self.backed != "auto":
            check_bool(self.backed, "backed")
        check_int(self.block_rows, "block_rows", 1)
        check_bool(self.allow_count_like_log, "allow_count_like_log")


@dataclass
class AutoencoderModelConfig:
    num_genes: Optional[int] = None  # checked against the data when given
    latent_dim: int = 20  # the cfDiffusion paper's: 128
    hidden_dims: List[int] = field(default_factory=lambda: [128])  # the paper's: 1024 1024 1024
    dropout: float = 0.0
    loss_ae: str = "auto"
    decoder_activation: str = "ReLU"
    kl_weight: float = 0.0  # 0: the deterministic autoencoder (L2-normalized latent); > 0: a variational one
    latent_norm: str = "sphere"  # the deterministic latent: L2-normalized (the original) or "none"
    # obs columns (comma-separated) the decoder reads beside the latent; "auto": cell_type1 when the data has it;
    # None / "none": none
    decoder_label_key: Optional[str] = "auto"
    encoder_genes: int = 0  # the encoder reads this many most variable genes; 0: every gene (the original)

    def validate(self):
        check_int(self.num_genes, "num_genes", 1, optional=True)
        check_int(self.latent_dim, "latent_dim", 1)
        check_int_list(self.hidden_dims, "hidden_dims")
        check_float(self.dropout, "dropout", 0, 1, high_open=True)
        check_str(self.loss_ae, "loss_ae", ("auto", "nb", "mse"))
        check_str(self.decoder_activation, "decoder_activation", ("ReLU", "linear"))
        check_float(self.kl_weight, "kl_weight", 0)
        check_str(self.latent_norm, "latent_norm", ("sphere", "none"))
        check_str(self.decoder_label_key, "decoder_label_key", optional=True)
        check_int(self.encoder_genes, "encoder_genes", 0)


@dataclass
class AutoencoderTrainingConfig:
    save_dir: str
    max_steps: int = 200000
    max_minutes: Optional[float] = None
    batch_size: int = 128
    lr: float = 3e-4  # chosen on validation cells (docs/fidelity.md); the cfDiffusion paper's: 1e-3
    dispersion_lr: Optional[float] = None  # the per-gene NB dispersion's learning rate (None: lr)
    weight_decay: float = 1e-5
    precision: str = "auto"
    seed: int = 0
    checkpoint_freq: int = 50000
    log_interval: int = 100
    state_dict: str = ""
    init_from: str = ""  # another autoencoder to start from, genes and labels matched by name (VAE/weight_transfer.py)
    resume_on_new_data: bool = False  # resume although the data's fingerprint differs (recorded in the checkpoint)
    start_step: Optional[int] = None
    val_fraction: float = 0.1
    early_stopping_patience: int = 0  # 0: off; else stop when the validation loss has not improved for this many steps
    latent_noise: float = 0.0  # sd of Gaussian noise on the latent the decoder reads in training (0: the original)
    count_thinning: float = 0.0  # training only: each cell keeps a share ~ U(1 - this, 1) of its counts (0: off)
    count_split: float = 0.0  # training only: the encoder reads this share of each cell's counts, the loss scores the rest (0: off)
    refit_dispersion: bool = True  # after training, fit the NB dispersion to the training cells, the rest frozen
    ema_rate: float = 0.0  # 0: off; else checkpoints, validation and early stopping use an EMA of the weights
    variable_gene_weight: float = 1.0  # the likelihood of the 2,000 most variable genes weighted this much (1: off)
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True

    def validate(self):
        _check_training_common(self)
        check_int(self.max_steps, "max_steps", 1)
        check_int(self.checkpoint_freq, "checkpoint_freq", 1)
        check_path(self.state_dict, "state_dict")
        check_path(self.init_from, "init_from")
        if self.init_from and self.state_dict:
            raise SettingError("{init_from} starts a new run from another autoencoder's weights, {state_dict} resumes "
                               "a run; give one of them", "init_from", "state_dict")
        check_int(self.start_step, "start_step", 0, optional=True)
        check_float(self.val_fraction, "val_fraction", 0, 1, high_open=True)
        check_int(self.early_stopping_patience, "early_stopping_patience", 0)
        check_float(self.latent_noise, "latent_noise", 0)
        check_float(self.count_thinning, "count_thinning", 0, 1, high_open=True)
        check_float(self.count_split, "count_split", 0, 1, high_open=True)
        if self.count_split and self.count_thinning:
            raise SettingError("{count_split} and {count_thinning} both reshape the training cells' counts; "
                               "set one of them to 0", "count_split", "count_thinning")
        check_float(self.dispersion_lr, "dispersion_lr", 0, low_open=True, optional=True)
        check_bool(self.refit_dispersion, "refit_dispersion")
        check_float(self.ema_rate, "ema_rate", 0, 1, high_open=True)
        check_float(self.variable_gene_weight, "variable_gene_weight", 0, low_open=True)


@dataclass
class DiffusionModelConfig:
    vae_path: str
    num_classes: Optional[List[int]] = None
    hidden_dims: List[int] = field(default_factory=lambda: [512, 512, 256, 128])
    dropout: float = 0.0
    latent_scale: str = "auto"
    branch: int = 0
    cache_interval: int = 5
    non_uniform: bool = False

    def validate(self):
        check_path(self.vae_path, "vae_path")
        check_int_list(self.num_classes, "num_classes", optional=True)
        check_int_list(self.hidden_dims, "hidden_dims")
        check_float(self.dropout, "dropout", 0, 1, high_open=True)
        if not isinstance(self.latent_scale, str) and not is_number(self.latent_scale):
            raise SettingError(f"{{latent_scale}} takes 'auto' or a positive number, got "
                               f"{literal(repr(self.latent_scale))}", "latent_scale")
        check_int(self.branch, "branch", 0)
        check_int(self.cache_interval, "cache_interval", 1)
        check_bool(self.non_uniform, "non_uniform")


@dataclass
class DiffusionTrainingConfig:
    save_dir: str = "checkpoint/diffusion"
    model_name: str = "cfDiffusion"
    lr_anneal_steps: int = 800000
    batch_size: int = 128
    microbatch: int = -1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    ema_rate: float = 0.9999
    p_uncond: float = 0.1
    save_interval: int = 200000
    log_interval: int = 100
    resume_checkpoint: str = ""
    resume_on_new_data: bool = False  # resume although the data's fingerprint differs (recorded in the checkpoint)
    max_minutes: Optional[float] = None
    seed: int = 0
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    precision: str = "auto"
    latents_on_disk: object = "auto"  # keep the latents in the run folder, read per batch (auto: with a streamed h5ad)

    def validate(self):
        _check_training_common(self)
        check_str(self.model_name, "model_name")
        if self.latents_on_disk != "auto":
            check_bool(self.latents_on_disk, "latents_on_disk")
        check_int(self.lr_anneal_steps, "lr_anneal_steps", 0)
        check_int(self.microbatch, "microbatch")
        check_float(self.ema_rate, "ema_rate", 0, 1)
        check_float(self.p_uncond, "p_uncond", 0, 1)
        check_int(self.save_interval, "save_interval", 1)
        check_path(self.resume_checkpoint, "resume_checkpoint")


def is_anndata(value):
    """An AnnData object (checked without importing anndata here)."""
    return any(cls.__name__ == "AnnData" and cls.__module__.startswith("anndata") for cls in type(value).__mro__)
