"""The settings of a training run as small dataclasses (data, model, training), not an argparse Namespace.

Each training CLI turns its flags into these with :func:`from_flags` and makes one library call. The
library refers to settings by their field names; :class:`SettingError` carries the field, and the CLI
words it as the flag that sets it (:func:`flag_of`), so a library caller sees ``num_genes ...`` and a
command-line user ``--num_genes ...``.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional



def from_flags(cls, args, **overrides):
    """An instance of the dataclass ``cls`` from the parsed flags with the same names."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def plain_dict(*configs):
    """The settings of ``configs`` merged into one flat dict of plain values (for checkpoints)."""
    merged = {}
    for config in configs:
        for key, value in dataclasses.asdict(config).items():
            if isinstance(value, (int, float, str, bool, list, type(None))):
                merged[key] = list(value) if isinstance(value, (list, tuple)) else value
    return merged


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


@dataclass
class AutoencoderModelConfig:
    num_genes: Optional[int] = None  # checked against the data when given
    latent_dim: int = 128
    hidden_dims: List[int] = field(default_factory=lambda: [1024, 1024, 1024])
    dropout: float = 0.0
    loss_ae: str = "auto"
    decoder_activation: str = "ReLU"


@dataclass
class AutoencoderTrainingConfig:
    save_dir: str
    max_steps: int = 200000
    max_minutes: Optional[float] = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    precision: str = "auto"
    seed: int = 0
    checkpoint_freq: int = 50000
    log_interval: int = 100
    state_dict: str = ""
    resume_on_new_data: bool = False  # resume although the data's fingerprint differs (recorded in the checkpoint)
    start_step: Optional[int] = None
    val_fraction: float = 0.1
    early_stopping_patience: int = 0  # 0: off; else stop when the validation loss has not improved for this many steps
    latent_noise: float = 0.0  # sd of Gaussian noise on the latent the decoder reads in training (0: the original)
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True


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
