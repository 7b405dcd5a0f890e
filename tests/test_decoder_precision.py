"""The count decoder's output layer in bf16 (the sampler's largest matmul): the logits stay within the
rounding bound of the fp32 ones, the draws keep their distribution, and the sampler chooses, records and
refuses the setting as documented (``--decoder_precision``)."""
import anndata
import numpy as np
import pytest
import torch

from guided_diffusion.core.errors import UsageError
from guided_diffusion.core.device import has_fast_bf16
from guided_diffusion.sampling.settings import SamplerSettings, check_settings, resolve_decoder_precision
from guided_diffusion.sampling.writer import write_decoded_h5ad
from synthetic import small_count_decoder
from test_checkpoints import legacy, refused, sample  # noqa: F401
from VAE.count_model import output_layer_logits
from VAE.VAE_model import VAE

UNIT_ROUNDOFF = 2.0 ** -9  # bf16 keeps 8 significant bits, rounding to nearest


def test_fp32_logits_are_the_trained_layer():
    torch.manual_seed(0)
    output = torch.nn.Linear(64, 500)
    hidden = torch.randn(37, 64)
    logits = output_layer_logits(output, hidden, "fp32")
    assert torch.equal(logits(5, 30), torch.nn.functional.linear(hidden[5:30], output.weight, output.bias))
    with pytest.raises(ValueError, match="fp32' or 'bf16"):
        output_layer_logits(output, hidden, "fp16")


def test_bf16_logits_stay_within_the_rounding_bound():
    torch.manual_seed(0)
    output = torch.nn.Linear(1024, 3000)
    with torch.no_grad():
        output.bias.uniform_(-12.0, -4.0)  # log gene shares: a bias this large would lose bits in bf16
    hidden = torch.randn(300, 1024)
    exact = torch.nn.functional.linear(hidden.double(), output.weight.double(), output.bias.double())
    logits = output_layer_logits(output, hidden, "bf16")(0, 300).double()
    assert logits.dtype == torch.float64 and logits.shape == (300, 3000)
    # each product's inputs are rounded (2 x 2^-9 relative), the sum once more (2^-9 of the product term);
    # the float32 bias is added afterwards, so the bias itself is not rounded
    products = hidden.double().abs() @ output.weight.double().abs().t()
    weight_term = exact - output.bias.double()
    bound = 2 * UNIT_ROUNDOFF * 1.01 * products + UNIT_ROUNDOFF * 1.01 * weight_term.abs() + 1e-5
    error = (logits - exact).abs()
    assert (error <= bound).all()
    assert error.max() > 1e-4  # it did run in bf16 (an fp32 product would be ~1e-6 off)
    # a logit rounded to bf16 as a whole (bias included, as autocast's F.linear returns it) is off by a median
    # 0.013 here (up to 2^-9 x 12 = 0.023 from the bias alone); adding the bias in float32 keeps it near 0.001
    assert error.median() < 0.003


def test_bf16_output_layer_draws_the_same_distribution():
    model, latent, totals = small_count_decoder(40, 3000)
    with torch.inference_mode():
        means = torch.softmax(model.decoder(latent), dim=1) * totals[:, None]
        draws = torch.stack([model.sample_counts(latent, totals, torch.Generator().manual_seed(s),
                                                 precision="bf16").to_dense() for s in range(200)])
        with pytest.raises(ValueError, match="fp32' or 'bf16"):
            model.sample_counts(latent, totals, torch.Generator(), precision="half")
    # 200 draws per entry: the average of 8,000 draws per gene is within a few % of its fp32 mean
    np.testing.assert_allclose(draws.mean((0, 1)).numpy(), means.mean(0).numpy(), rtol=0.1, atol=0.3)
    assert abs(draws.sum(2).mean().item() - 3000) < 30


@pytest.mark.parametrize("requested, precision, observation, expected", [
    ("auto", "bf16", "counts", "bf16"),
    ("auto", "fp32", "counts", "fp32"),  # --precision fp32 keeps the whole sampler exact
    ("auto", "bf16", "mean", "fp32"),  # decoded means are written as computed
    ("fp32", "bf16", "counts", "fp32"),
    ("bf16", "fp32", "counts", "bf16"),
])
def test_decoder_precision_follows_the_denoiser_and_the_observation(requested, precision, observation, expected):
    settings = SamplerSettings(precision=precision, decoder_precision=requested)
    assert resolve_decoder_precision(settings, observation, "cpu") == expected


def test_auto_precision_follows_the_device():
    settings = SamplerSettings(precision="auto", decoder_precision="auto")
    expected = "bf16" if has_fast_bf16("cpu") else "fp32"
    assert resolve_decoder_precision(settings, "counts", "cpu") == expected


def test_bf16_decoded_means_and_unknown_values_are_refused():
    with pytest.raises(UsageError, match="applies to count draws"):
        resolve_decoder_precision(SamplerSettings(decoder_precision="bf16"), "mean", "cpu")
    with pytest.raises(UsageError, match="--decoder_precision must be one of"):
        check_settings(SamplerSettings(decoder_precision="fp16"))
    model = VAE(num_genes=30, latent_dim=8, hidden_dims=(16, 16, 16), loss_ae="nb").eval()

    class Decoder:
        genes = [f"g{i}" for i in range(30)]

    Decoder.model = model
    with pytest.raises(ValueError, match="screened count draws only"):
        write_decoded_h5ad("unused.h5ad", Decoder, np.zeros((2, 8), np.float32), None, {},
                           decoder_precision="bf16")


def test_the_sampler_records_its_decoder_precision(legacy, tmp_path, capsys):
    default = anndata.read_h5ad(sample(legacy, tmp_path / "default", "--observation", "counts", "--precision", "bf16"))
    assert default.uns["cfdiffusion"]["decoder_precision"] == "bf16"
    exact = anndata.read_h5ad(sample(legacy, tmp_path / "fp32", "--observation", "counts", "--precision", "fp32"))
    assert exact.uns["cfdiffusion"]["decoder_precision"] == "fp32"
    kept = anndata.read_h5ad(sample(legacy, tmp_path / "kept", "--observation", "counts", "--precision", "bf16",
                                    "--decoder_precision", "fp32"))
    assert kept.uns["cfdiffusion"]["decoder_precision"] == "fp32"
    # the same latents either way (the decoder comes after the reverse process)
    np.testing.assert_array_equal(np.load(next((tmp_path / "default").glob("cell*.npy"))),
                                  np.load(next((tmp_path / "kept").glob("cell*.npy"))))
    line = refused(capsys, sample, legacy, tmp_path / "mean", "--observation", "mean", "--decoder_precision", "bf16")
    assert "--decoder_precision bf16 applies to count draws" in line
    assert not (tmp_path / "mean" / "generated.h5ad").exists()
