"""The main job from Python (a notebook): train or load a model, generate cells into an AnnData.

    from guided_diffusion.api import train_autoencoder, train_diffusion, load_model, generate
    from exp_script.api import evaluate
    vae = train_autoencoder("dataset/baron_human.h5ad", "checkpoint/nb/ae", max_steps=600)
    model = train_diffusion("dataset/baron_human.h5ad", vae, "checkpoint/nb/diffusion", lr_anneal_steps=3000)
    adata = generate(model, conditions=["cell_type1=beta"], num_samples=200)   # an AnnData in memory
    metrics = evaluate(real_adata, adata, label_key="cell_type1")["generated"]["overall"]

Each call makes the one library call its command-line tool makes (``VAE/VAE_train.py``, ``cell_train.py``,
``cell_sample.py``, ``exp_script/evaluate.py``), with the same defaults and the same checks (the library's:
the settings dataclasses are checked field by field for the CLIs and the API alike); keyword arguments are
the tools' flags without ``--``, given as Python values (``match_counts=True``, not ``"True"``). Bad input
raises :class:`UsageError` (a :class:`SettingError` naming the parameter) with a one-line message.

Nothing goes through temporary files: training streams an in-memory AnnData through the loader as it
streams a file (a backed AnnData is read from its file), :func:`load_model` keeps the networks and
:func:`generate` decodes the generated cells straight into an AnnData. (The evaluator reads files: there
an in-memory AnnData is written to a temporary .h5ad first.)
"""
import contextlib
import dataclasses
import os
import tempfile
import types

import anndata

from guided_diffusion.core.checks import check_bool, check_int
from guided_diffusion.core.errors import SettingError, UsageError
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.sampling.pipeline import GENERATED, sample_cells, sample_cells_in_memory
from guided_diffusion.sampling.request import SamplingRequest
from guided_diffusion.sampling.settings import SamplerSettings
from guided_diffusion.cli import apply_thread_flags
from guided_diffusion.training.config import (AutoencoderModelConfig, AutoencoderTrainingConfig, DataConfig,
                                              DiffusionModelConfig, DiffusionTrainingConfig)

__all__ = ["Model", "SettingError", "UsageError", "generate", "load_model", "train_autoencoder", "train_diffusion"]
THREAD_OPTIONS = ("threads", "deterministic")


# ---- inputs: a path or an AnnData ------------------------------------------------------------------
@contextlib.contextmanager
def h5ad_path(data, what="data", layer=""):
    """The path of ``data`` for readers of files (the evaluator): a path as given, a backed AnnData's file,
    or an in-memory AnnData written to a temporary .h5ad (X, obs, var, layers and raw; removed when the block
    ends). ``layer`` is the matrix the caller will read: reading X of a scaled AnnData that has ``.raw`` is
    refused with a pointer to it."""
    data = input_data(data, what, layer)
    if not isinstance(data, anndata.AnnData):
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="cfdiffusion_") as folder:
        path = os.path.join(folder, f"{what}.h5ad")
        slim = anndata.AnnData(X=data.X, obs=data.obs, var=data.var, layers=dict(data.layers),
                               raw=data.raw.to_adata() if data.raw is not None else None)
        slim.write_h5ad(path)
        yield path


def input_data(data, what="data", layer=""):
    """``data`` as the loader takes it: a path (as a string), a backed AnnData's file, or an in-memory AnnData
    itself (read in place, nothing written). ``layer`` is the matrix the caller will read: reading X of a
    scaled AnnData that has ``.raw`` is refused with a pointer to it."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if not isinstance(data, anndata.AnnData):
        raise SettingError(f"{{{what}}} must be an .h5ad path or an AnnData, got {type(data).__name__}", what)
    if data.isbacked:
        return os.fspath(data.filename)
    if layer == "" and data.raw is not None and data.X is not None and smallest_value(data.X) < 0:
        raise UsageError(f"the {what} AnnData's X holds negative values (scaled data?) and it has .raw: pass "
                         f"layer='raw' (with input_is_log=True if .raw holds log-normalized values)")
    return data


def smallest_value(matrix):
    values = matrix.data if hasattr(matrix, "nnz") else matrix
    return float(values.min()) if values.size else 0.0


def split_options(options, *configs, arguments=(), extra=THREAD_OPTIONS):
    """Keyword arguments shared out to the dataclasses ``configs`` by field name; an unknown one, or one of
    the call's own ``arguments``, is refused. ``extra`` names accepted options handled elsewhere."""
    known = [{f.name for f in dataclasses.fields(config)} - set(arguments) for config in configs]
    unknown = sorted(set(options) - set().union(*known) - set(extra))
    if unknown:
        if unknown[0] in arguments:
            raise UsageError(f"{unknown[0]} is an argument of this call, not an option; give it in its place")
        accepted = sorted(set().union(*known) | set(extra))
        raise UsageError(f"unknown option {unknown[0]!r}; accepted: {', '.join(accepted)}")
    return [{key: value for key, value in options.items() if key in names} for names in known]


def as_list(value):
    """A flag that takes several values, given one value or several (None stays None)."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    return [value]


def apply_threads_option(options):
    """``threads``/``deterministic`` as the CLIs' ``--threads``/``--deterministic`` (default: the cores
    this process may use)."""
    check_int(options.get("threads"), "threads", 1, optional=True)
    check_bool(options.get("deterministic", False), "deterministic")
    apply_thread_flags(types.SimpleNamespace(threads=options.get("threads"),
                                             deterministic=options.get("deterministic", False)))


# ---- training ------------------------------------------------------------------------------------
def train_autoencoder(data, save_dir, **options):
    """Train (or resume) the autoencoder on ``data`` (.h5ad path or AnnData); returns the checkpoint path
    (with ``early_stopping_patience``, the best-weights file ``model_seed=S_best.pt``).

    ``options`` are ``VAE/VAE_train.py``'s flags (``max_steps=600``, ``hidden_dims=[256, 256]``,
    ``input_is_log=True``, ``layer="counts"``, ``threads=1``, ...) with its defaults. An in-memory AnnData
    is read in place by the loader (no temporary file).

    >>> vae_path = train_autoencoder(adata, "checkpoint/nb/ae", max_steps=600, progress=False)
    """
    from VAE.autoencoder_training import train_autoencoder as train

    data_options, model_options, training_options = split_options(
        options, DataConfig, AutoencoderModelConfig, AutoencoderTrainingConfig, arguments=("data_dir", "save_dir"))
    data_options.pop("label_key", None)  # the autoencoder reads no labels (as its CLI)
    data = input_data(data, layer=data_options.get("layer", ""))
    apply_threads_option(options)
    result_path, report, seconds = train(DataConfig(data_dir=data, **data_options),
                                         AutoencoderModelConfig(**model_options),
                                         AutoencoderTrainingConfig(save_dir=as_path(save_dir, "save_dir"),
                                                                   **training_options))
    if report and training_options.get("progress", True):
        best = (f"; best validation loss {report['best_val_loss']:.5f} at step {report['best_step']}"
                if "best_step" in report else "")
        print(f"saved {report.get('last_path', result_path)} ({seconds:.1f} s){best}; held-out reconstruction on "
              f"{report['n_cells']} cells: MSE {report['mse']:.4f}, median per-cell Pearson "
              f"{report['median_cell_pearson']:.4f}")
    return result_path


def train_diffusion(data, vae_path, save_dir="checkpoint/diffusion", **options):
    """Train (or resume) the diffusion model on ``data`` (.h5ad path or AnnData) in the latent space of the
    autoencoder ``vae_path``; returns the trained :class:`Model` (files in ``save_dir/model_name/``).

    ``options`` are ``cell_train.py``'s flags (``lr_anneal_steps=3000``, ``label_key=["cell_type1",
    "donor"]`` or one key as a string, ``model_name``, ``hidden_dims``, ``threads``, ...) with its defaults.
    An in-memory AnnData is read in place by the loader (no temporary file).

    >>> model = train_diffusion(adata, vae_path, "checkpoint/nb/diffusion", lr_anneal_steps=3000)
    """
    from guided_diffusion.training.pipeline import train_diffusion as train

    data_options, model_options, training_options = split_options(
        options, DataConfig, DiffusionModelConfig, DiffusionTrainingConfig,
        arguments=("data_dir", "save_dir", "vae_path"))
    for target, name in ((data_options, "label_key"), (model_options, "num_classes")):
        if name in target:  # one label key: a value instead of a list
            target[name] = as_list(target[name])
    data = input_data(data, layer=data_options.get("layer", ""))
    apply_threads_option(options)
    model_path = train(DataConfig(data_dir=data, **data_options),
                       DiffusionModelConfig(vae_path=as_path(vae_path, "vae_path"), **model_options),
                       DiffusionTrainingConfig(save_dir=as_path(save_dir, "save_dir"), **training_options))
    return load_model(model_path, device=training_options.get("device", "auto"))


def as_path(value, name):
    """A path argument as a string (a str or os.PathLike; anything else refused naming ``name``)."""
    if not isinstance(value, (str, os.PathLike)):
        raise SettingError(f"{{{name}}} must be a path, got {type(value).__name__}", name)
    return os.fspath(value)


# ---- a trained model -----------------------------------------------------------------------------
@dataclasses.dataclass
class Model:
    """A trained diffusion model, loaded: its networks (the denoiser with its checkpoint record, the
    autoencoder), their files and what it can generate. Two Models are equal when they describe the same
    files and record (the networks are not compared)."""

    path: str
    vae_path: str
    label_keys: list
    vocabularies: dict  # label key -> its values, in code order
    step: int
    use_ema: bool = True
    loaded: object = dataclasses.field(default=None, repr=False, compare=False)  # checkpoints.LoadedModel
    autoencoder: object = dataclasses.field(default=None, repr=False, compare=False)
    device: object = dataclasses.field(default=None, repr=False, compare=False)

    def conditions(self):
        """Every condition seen in training, as ``KEY=VALUE[,KEY=VALUE]`` specs for :func:`generate`."""
        if self.loaded is not None:
            counts = self.loaded.checkpoint.condition_counts or []
        else:
            from guided_diffusion.checkpoints import DiffusionCheckpoint

            counts = DiffusionCheckpoint.load(self.path).condition_counts or []
        return [",".join(f"{key}={self.vocabularies[key][code]}" for key, code in zip(self.label_keys, row[:-1]))
                for row in counts]


def __getattr__(name):
    if name == "evaluate":  # evaluation lives above the library, in exp_script
        raise AttributeError("evaluate is exp_script.api.evaluate: from exp_script.api import evaluate")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_model(model_path, vae_path="", use_ema=True, device="auto"):
    """Load and check a diffusion checkpoint (``model{step}.pt`` or ``ema_*.pt``) and find its autoencoder
    (recorded in the checkpoint, checked by its sha256, or ``vae_path``), as ``cell_sample.py`` does; the
    returned :class:`Model` holds both networks, which :func:`generate` uses (nothing is loaded again).

    >>> model = load_model("checkpoint/diffusion/cfDiffusion/model003000.pt")
    >>> model.label_keys, model.vocabularies["cell_type1"][:3]
    """
    from guided_diffusion.core.device import resolve_device
    from guided_diffusion.checkpoints import load_diffusion_model, resolve_autoencoder

    model_path = as_path(model_path, "model_path")
    vae_path = as_path(vae_path, "vae_path")
    check_bool(use_ema, "use_ema")
    if not isinstance(device, str):
        raise SettingError(f"{{device}} must be 'auto', 'cpu' or 'cuda', got {type(device).__name__}", "device")
    device = resolve_device(device)
    loaded = load_diffusion_model(os.fspath(model_path), use_ema=use_ema, device=device)
    autoencoder = resolve_autoencoder(loaded, os.fspath(vae_path) if vae_path else "", device)
    return Model(path=os.fspath(model_path), vae_path=autoencoder.path, label_keys=loaded.label_keys,
                 vocabularies={key: list(values) for key, values in loaded.vocabularies.items()},
                 step=int(loaded.checkpoint.step), use_ema=use_ema, loaded=loaded, autoencoder=autoencoder,
                 device=device)


# ---- generation ----------------------------------------------------------------------------------
def condition_spec(condition):
    """A condition as ``cell_sample.py --condition`` takes it, from a spec string or a {key: value} dict."""
    if isinstance(condition, str):
        return condition
    if isinstance(condition, dict):
        for key, value in condition.items():
            if any(mark in f"{key}{value}" for mark in ",="):
                raise UsageError(f"condition {key}={value}: keys and values with ',' or '=' cannot be given")
        return ",".join(f"{key}={value}" for key, value in condition.items())
    raise UsageError(f"a condition is 'KEY=VALUE[,KEY=VALUE]' or a dict, got {type(condition).__name__}")


def generate(model, conditions=None, sample_dir=None, **options):
    """Generate cells and return them as an AnnData in memory: what the sampler writes to
    ``generated.h5ad`` (labels in obs, X log-normalized, ``layers['counts']`` with a count autoencoder,
    ``uns['log1p']`` as scanpy sets it, ``uns['cfdiffusion']`` the run's record), the same cells bit for bit
    for the same seed and settings, built in memory without touching the disk.

    ``model`` is a :class:`Model` (its networks are used as loaded) or a checkpoint path; ``conditions`` a
    list of ``"cell_type1=beta"`` specs or ``{"cell_type1": "beta"}`` dicts (default: every condition seen
    in training). ``options`` are ``cell_sample.py``'s flags (``num_samples=1000``, ``guide_w``, ``seed``,
    ``match_counts``, ``observation``, ``threads``, ...) with its defaults. With ``sample_dir`` the files
    (latents, generated.h5ad, manifest.json) are written there as well, as ``cell_sample.py`` writes them.

    >>> adata = generate(model, conditions=[{"cell_type1": "beta"}], num_samples=200, seed=1)
    """
    request_options, settings_options = split_options(options, SamplingRequest, SamplerSettings,
                                                      arguments=("model_path", "sample_dir", "conditions"))
    loaded = autoencoder = None
    if isinstance(model, Model):
        if model.loaded is not None and reuses_networks(model, request_options):
            loaded, autoencoder = model.loaded, model.autoencoder
            request_options.setdefault("device", str(model.device))
        request_options.setdefault("vae_path", model.vae_path)
        request_options.setdefault("use_ema", model.use_ema)
        model_path = model.path
    elif isinstance(model, (str, os.PathLike)):
        model_path = os.fspath(model)
    else:
        raise SettingError(f"{{model}} must be a Model (load_model, train_diffusion) or a checkpoint path, got "
                           f"{type(model).__name__}", "model")
    specs = [condition_spec(condition) for condition in ([conditions] if isinstance(conditions, (str, dict))
                                                           else (conditions or []))]
    request_options.update(model_path=model_path, conditions=specs)
    apply_threads_option(options)
    settings = SamplerSettings(**settings_options)
    if sample_dir is None:
        return sample_cells_in_memory(SamplingRequest(**request_options), settings, loaded, autoencoder)
    sample_dir = as_path(sample_dir, "sample_dir")
    check_writable_dir(sample_dir, "sample_dir")
    path = sample_cells(SamplingRequest(sample_dir=sample_dir, **request_options), settings, loaded, autoencoder)
    return anndata.read_h5ad(path if path else os.path.join(sample_dir, GENERATED))


def reuses_networks(model, request_options):
    """Whether the options leave ``model``'s loaded networks as they are (no other weights, autoencoder or
    device asked for)."""
    from guided_diffusion.core.device import resolve_device

    if request_options.get("use_ema", model.use_ema) != model.use_ema:
        return False
    if request_options.get("vae_path", model.vae_path) not in ("", model.vae_path):
        return False
    device = request_options.get("device")
    if device is None:
        return True
    return isinstance(device, str) and str(resolve_device(device)) == str(model.device)
