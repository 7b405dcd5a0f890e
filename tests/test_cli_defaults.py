"""The trainers' flags take their defaults from the settings dataclasses (one statement of each default)."""
import cell_train
from guided_diffusion.training.config import (AutoencoderModelConfig, AutoencoderTrainingConfig,
                                              DiffusionModelConfig, DiffusionTrainingConfig, defaults_of)
from VAE import VAE_train


def parsed_defaults(parser, required):
    return vars(parser.parse_args(required))


def test_the_diffusion_trainer_flags_default_to_the_settings():
    args = parsed_defaults(cell_train.build_parser(), ["--data_dir", "d.h5ad", "--vae_path", "v.pt"])
    defaults = defaults_of(DiffusionModelConfig, DiffusionTrainingConfig)
    shared = set(args) & set(defaults)
    assert len(shared) > 15
    assert {name: args[name] for name in shared} == {name: defaults[name] for name in shared}


def test_the_autoencoder_trainer_flags_default_to_the_settings():
    args = parsed_defaults(VAE_train.build_parser(), ["--data_dir", "d.h5ad", "--save_dir", "s"])
    defaults = defaults_of(AutoencoderModelConfig, AutoencoderTrainingConfig)
    shared = set(args) & set(defaults)
    assert len(shared) > 15
    assert {name: args[name] for name in shared} == {name: defaults[name] for name in shared}


def test_defaults_of_reads_defaults_and_factories():
    from dataclasses import dataclass, field

    @dataclass
    class Example:
        required: int
        plain: float = 0.5
        made: list = field(default_factory=lambda: [1, 2])

    assert defaults_of(Example) == {"plain": 0.5, "made": [1, 2]}
