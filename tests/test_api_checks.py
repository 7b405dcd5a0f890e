"""One checking layer for the command-line tools and the Python API: the library checks every setting
(typed: no string taken as a number or a boolean, no boolean as a number) with one-line SettingErrors naming
the parameter; the API gets them as they are, the CLIs worded as flags."""
import os

import pytest
import torch

from exp_script import api as evaluation_api
from guided_diffusion import api
from guided_diffusion.core.errors import SettingError, UsageError, settings_worded_as_flags
from guided_diffusion.sampling.request import SamplingRequest
from guided_diffusion.sampling.pipeline import check_sampling_inputs, sample_cells
from guided_diffusion.sampling.settings import SamplerSettings
from guided_diffusion.training.config import (AutoencoderModelConfig, AutoencoderTrainingConfig, DataConfig,
                                              DiffusionModelConfig, DiffusionTrainingConfig)
from synthetic import make_counts_adata
from VAE.autoencoder_training import train_autoencoder as library_train_autoencoder

AUTOENCODER = dict(max_steps=10, hidden_dims=[16], latent_dim=4, batch_size=32, progress=False)
DIFFUSION = dict(lr_anneal_steps=10, hidden_dims=[16, 16, 8, 8], label_key="cell_type1", progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_checks")
    adata = make_counts_adata(n_cells=120, n_genes=20, seed=3)
    torch.set_num_threads(1)
    vae = api.train_autoencoder(adata, root / "ae", **AUTOENCODER)
    model = api.train_diffusion(adata, vae, root / "diffusion", **DIFFUSION)
    return {"root": root, "adata": adata, "vae": vae, "model": model}


def one_line_error(call, message, kind=SettingError):
    with pytest.raises(UsageError) as error:
        call()
    assert isinstance(error.value, kind), f"{type(error.value).__name__}: {error.value}"
    assert message in str(error.value) and "\n" not in str(error.value)
    return error.value


@pytest.mark.parametrize("options, message", [
    (dict(num_samples=0), "num_samples must be a positive integer, got 0"),
    (dict(num_samples=-3), "num_samples must be a positive integer, got -3"),
    (dict(num_samples=2.5), "num_samples must be a positive integer, got 2.5"),
    (dict(num_samples="5"), "num_samples must be a positive integer, got '5'"),
    (dict(num_samples=True), "num_samples must be a positive integer, got True"),
    (dict(match_counts="False"), "match_counts must be True or False, got 'False'"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(seed="1"), "seed must be an integer, got '1'"),
    (dict(guide_w="1"), "guide_w must be a number, or a dict of numbers per label key, got '1'"),
    (dict(guide_w={"cell_type1": "1"}), "guide_w must be a number"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(threads=-2), "threads must be a positive integer, got -2"),
    (dict(threads="2"), "threads must be a positive integer, got '2'"),
    (dict(observation="means"), "observation must be one of 'auto', 'counts', 'mean', got 'means'"),
    (dict(use_ddim=1), "use_ddim must be True or False, got 1"),
    (dict(compression="zip"), "compression must be one of 'none', 'gzip', 'lzf', got 'zip'"),
])
def test_generate_refuses_bad_settings(trained, options, message):
    one_line_error(lambda: api.generate(trained["model"], progress=False, **options), message)


def test_generate_refuses_what_is_not_a_model():
    one_line_error(lambda: api.generate(None), "model must be a Model (load_model, train_diffusion) or a "
                                               "checkpoint path, got NoneType")


def test_a_bad_setting_writes_nothing_into_a_sample_dir(trained, tmp_path):
    one_line_error(lambda: api.generate(trained["model"], sample_dir=tmp_path / "out", num_samples=0),
                   "num_samples must be a positive integer")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("call, message", [
    (lambda t, d: api.train_autoencoder(t["adata"], d, **dict(AUTOENCODER, max_steps=0)),
     "max_steps must be a positive integer, got 0"),
    (lambda t, d: api.train_autoencoder(t["adata"], d, **dict(AUTOENCODER, hidden_dims=64)),
     "hidden_dims must be a non-empty list of positive integers, got 64"),
    (lambda t, d: api.train_autoencoder(t["adata"], d, **dict(AUTOENCODER, batch_size=0)),
     "batch_size must be a positive integer, got 0"),
    (lambda t, d: api.train_autoencoder(t["adata"], d, **dict(AUTOENCODER, seed=1.5)),
     "seed must be zero or a positive integer, got 1.5"),
    (lambda t, d: api.train_autoencoder(t["adata"], d, **dict(AUTOENCODER, input_is_log="False")),
     "input_is_log must be True or False, got 'False'"),
    (lambda t, d: api.train_autoencoder(t["adata"], d, **dict(AUTOENCODER, threads=-2)),
     "threads must be a positive integer, got -2"),
    (lambda t, d: api.train_diffusion(t["adata"], t["vae"], d, **dict(DIFFUSION, lr_anneal_steps=-5)),
     "lr_anneal_steps must be zero or a positive integer, got -5"),
    (lambda t, d: api.train_diffusion(t["adata"], t["vae"], d, **dict(DIFFUSION, p_uncond=2)),
     "p_uncond must be a number in [0, 1], got 2"),
    (lambda t, d: api.train_diffusion(t["adata"], t["vae"], d, **dict(DIFFUSION, hidden_dims=64)),
     "hidden_dims must be a non-empty list of positive integers, got 64"),
    (lambda t, d: api.train_diffusion(t["adata"], t["vae"], d, **dict(DIFFUSION, batch_size="8")),
     "batch_size must be a positive integer, got '8'"),
    (lambda t, d: api.train_diffusion(t["adata"], t["vae"], d, **dict(DIFFUSION, overwrite="True")),
     "overwrite must be True or False, got 'True'"),
])
def test_training_refuses_bad_settings_and_writes_nothing(trained, tmp_path, call, message):
    one_line_error(lambda: call(trained, tmp_path / "run"), message)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.pt"))


@pytest.mark.parametrize("options, message", [
    (dict(n_pcs=0), "n_pcs must be a positive integer, got 0"),
    (dict(n_hvg="30"), "n_hvg must be a positive integer, got '30'"),
    (dict(controls="False"), "controls must be True or False, got 'False'"),
])
def test_evaluation_refuses_bad_settings(trained, options, message):
    one_line_error(lambda: evaluation_api.evaluate(trained["adata"], trained["adata"], progress=False, **options),
                   message)


# ---- one layer: the library raises what the API raises; the CLI words it as a flag ------------------
def test_the_sampler_library_raises_what_the_api_raises(trained, tmp_path):
    request = SamplingRequest(model_path=trained["model"].path, sample_dir=str(tmp_path), num_samples=0)
    from_library = one_line_error(lambda: sample_cells(request, SamplerSettings()), "num_samples")
    from_api = one_line_error(lambda: api.generate(trained["model"], num_samples=0), "num_samples")
    assert str(from_library) == str(from_api)
    with pytest.raises(UsageError, match="^--num_samples must be a positive integer, got 0$"):
        with settings_worded_as_flags():
            sample_cells(request, SamplerSettings())
    assert not os.listdir(tmp_path)


def test_the_training_library_raises_what_the_api_raises(trained, tmp_path):
    call = lambda: library_train_autoencoder(DataConfig(data_dir=trained["adata"]), AutoencoderModelConfig(),
                                             AutoencoderTrainingConfig(save_dir=str(tmp_path), max_steps=0))
    error = one_line_error(call, "max_steps must be a positive integer, got 0")
    assert str(error.as_flag()) == "--max_steps must be a positive integer, got 0"


@pytest.mark.parametrize("config", [
    DataConfig(data_dir="x.h5ad", backed="yes"), DataConfig(data_dir=3), DataConfig(data_dir="x", label_key="a"),
    AutoencoderModelConfig(dropout=1.0), AutoencoderModelConfig(loss_ae="poisson"),
    AutoencoderTrainingConfig(save_dir="x", val_fraction=1), AutoencoderTrainingConfig(save_dir="x", lr=0),
    DiffusionModelConfig(vae_path="x", latent_scale=True), DiffusionModelConfig(vae_path="x", branch=-1),
    DiffusionTrainingConfig(ema_rate=1.5), DiffusionTrainingConfig(max_minutes=0),
])
def test_each_config_checks_its_fields(config):
    with pytest.raises(SettingError):
        config.validate()


@pytest.mark.parametrize("config", [
    DataConfig(data_dir="x.h5ad"), DataConfig(data_dir="x", backed=True, label_key=["a", "b"]),
    AutoencoderModelConfig(), AutoencoderTrainingConfig(save_dir="x", max_minutes=0.5),
    DiffusionModelConfig(vae_path="x", latent_scale=1), DiffusionModelConfig(vae_path="x", latent_scale="2.5"),
    DiffusionTrainingConfig(lr_anneal_steps=0, microbatch=-1),
])
def test_the_defaults_and_what_the_flags_give_pass(config):
    config.validate()


def test_the_sampler_checks_pass_the_defaults():
    check_sampling_inputs(SamplingRequest(model_path="m.pt"), SamplerSettings())
    check_sampling_inputs(SamplingRequest(model_path="m.pt", num_classes=[3], conditions=["a=b"]),
                          SamplerSettings(guide_w={"a": 1}, cache_interval=2, branch=0, non_uniform=True))
