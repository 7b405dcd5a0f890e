"""--init_from: a new autoencoder run starts from another autoencoder's weights, genes and decoder labels matched by
name. With the same genes and labels the started model is the source (same latents, same decoded output); with
other genes the shared genes carry the source's weights (the encoder ignores genes the source did not read, the
decoder's output on shared genes is the source's) and new genes start fresh; labels are matched by key and value.
A run records what was matched; other architectures, inputs, too few shared genes, and --init_from with
--state_dict are refused with one line."""
import numpy as np
import pytest
import torch

from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.core.errors import SettingError
from guided_diffusion.training.config import AutoencoderTrainingConfig
from VAE.autoencoder_checkpoint import AutoencoderCheckpoint
from VAE.VAE_model import VAE
from VAE.weight_transfer import transfer_weights
from test_autoencoder_count_thinning import train

NORMALIZATION = {"input_is_log": False, "target_sum": 1e4}


def trained_source(tmp_path, genes, labels=None, **config):
    """A randomly initialized autoencoder with non-trivial weights everywhere (BatchNorm statistics, label
    effects, dispersion), saved as a checkpoint; returns (path, model)."""
    torch.manual_seed(0)
    keys, values = (["cell_type"], [labels]) if labels else ([], [])
    model = VAE(len(genes), latent_dim=config.get("latent_dim", 5), hidden_dims=config.get("hidden_dims", (12,)),
                loss_ae="nb", decoder_label_keys=keys, decoder_labels=values)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "running_var" in name:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif tensor.dtype.is_floating_point:
                tensor.copy_(torch.randn_like(tensor) * 0.3)
    path = tmp_path / "source.pt"
    AutoencoderCheckpoint(model_config=model.config(), state_dict=model.state_dict(), genes=list(genes),
                          normalization=dict(NORMALIZATION), step=7).save(str(path))
    return path, model.eval()


def fresh(genes, labels=None, **config):
    torch.manual_seed(1)
    keys, values = (["cell_type"], [labels]) if labels else ([], [])
    return VAE(len(genes), latent_dim=config.get("latent_dim", 5), hidden_dims=config.get("hidden_dims", (12,)),
               loss_ae="nb", decoder_label_keys=keys, decoder_labels=values, encoder_genes=config.get("encoder", ()))


def test_same_genes_and_labels_start_as_the_source(tmp_path):
    genes = [f"g{i}" for i in range(30)]
    path, source = trained_source(tmp_path, genes, labels=["a", "b"])
    model = fresh(genes, labels=["a", "b"])
    record = transfer_weights(str(path), model, genes, NORMALIZATION)
    model.eval()
    x, codes = torch.rand(9, 30) * 3, torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    torch.testing.assert_close(model.encode(x), source.encode(x))
    z = source.encode(x)
    torch.testing.assert_close(model.decode(z, codes), source.decode(z, codes))
    torch.testing.assert_close(model.log_theta, source.log_theta)
    assert record["shared_genes"] == 30 and record["labels_shared"] == 2 and record["source_step"] == 7


def test_other_genes_are_matched_by_name_and_new_ones_start_fresh(tmp_path):
    source_genes = [f"g{i}" for i in range(30)]
    path, source = trained_source(tmp_path, source_genes)
    # this data: 24 of the source's genes, in reverse order, and 4 genes the source never saw
    genes = source_genes[:24][::-1] + ["new0", "new1", "new2", "new3"]
    model = fresh(genes)
    untouched = model.decoder[-1].weight[24:].clone()
    record = transfer_weights(str(path), model, genes, NORMALIZATION)
    model.eval()
    x_source = torch.zeros(6, 30)
    x_source[:, :24] = torch.rand(6, 24) * 3
    x = torch.cat([x_source[:, :24].flip(1), torch.rand(6, 4) * 5], dim=1)  # new genes must not move the latent
    torch.testing.assert_close(model.encode(x), source.encode(x_source))
    z = source.encode(x_source)
    with torch.no_grad():
        logits, source_logits = model.run_decoder(z), source.run_decoder(z)
    torch.testing.assert_close(logits[:, :24], source_logits[:, :24].flip(1))
    torch.testing.assert_close(model.log_theta[:24], source.log_theta[:24].flip(0))
    assert torch.equal(model.decoder[-1].weight[24:], untouched)  # a new gene keeps its fresh start
    assert record["shared_genes"] == 24 and record["encoder_genes_shared"] == 24 and record["labels_shared"] == 0


def test_an_encoder_that_reads_some_genes_takes_the_source_columns_of_those_genes(tmp_path):
    genes = [f"g{i}" for i in range(30)]
    path, source = trained_source(tmp_path, genes)
    model = fresh(genes, encoder=[3, 8, 20, 29])
    transfer_weights(str(path), model, genes, NORMALIZATION)
    first = model.encoder[0].weight
    torch.testing.assert_close(first, source.encoder[0].weight[:, [3, 8, 20, 29]])


def test_labels_are_matched_by_key_and_value(tmp_path):
    genes = [f"g{i}" for i in range(30)]
    path, source = trained_source(tmp_path, genes, labels=["a", "b"])
    model = fresh(genes, labels=["b", "c"])
    with torch.no_grad():
        for effect in model.decoder_label_effects:
            effect.weight.fill_(5.0)
    record = transfer_weights(str(path), model, genes, NORMALIZATION)
    for mine, theirs in zip(model.decoder_label_effects, source.decoder_label_effects):
        torch.testing.assert_close(mine.weight[0], theirs.weight[1])  # b from the source's b
        assert torch.equal(mine.weight[1], torch.zeros_like(mine.weight[1]))  # c: no shift
    assert record["labels_shared"] == 1
    unlabelled = fresh(genes, labels=["a"])
    transfer_weights(str(trained_source(tmp_path, genes)[0]), unlabelled, genes, NORMALIZATION)
    assert all(not effect.weight.any() for effect in unlabelled.decoder_label_effects)


@pytest.mark.parametrize("change, words", [({"latent_dim": 6}, "latent_dim 5, this run 6"),
                                           ({"hidden_dims": (16,)}, "hidden_dims [12], this run [16]")])
def test_another_architecture_is_refused(tmp_path, change, words):
    genes = [f"g{i}" for i in range(30)]
    path, _ = trained_source(tmp_path, genes)
    with pytest.raises(SettingError, match="init_from") as error:
        transfer_weights(str(path), fresh(genes, **change), genes, NORMALIZATION)
    assert words in str(error.value)


def test_other_input_and_too_few_shared_genes_are_refused(tmp_path):
    genes = [f"g{i}" for i in range(30)]
    path, _ = trained_source(tmp_path, genes)
    with pytest.raises(SettingError, match="target_sum"):
        transfer_weights(str(path), fresh(genes), genes, {"input_is_log": False, "target_sum": 1e6})
    others = genes[:14] + [f"x{i}" for i in range(16)]
    with pytest.raises(SettingError, match="shares 14 of this data's 30 genes"):
        transfer_weights(str(path), fresh(others), others, NORMALIZATION)


def test_init_from_with_state_dict_is_refused():
    with pytest.raises(SettingError, match="give one of them"):
        AutoencoderTrainingConfig(save_dir="x", init_from="a.pt", state_dict="b.pt").validate()


def test_a_run_starts_from_the_source_and_records_it(tmp_path, counts_h5ad):
    source = train(counts_h5ad, tmp_path / "source")
    started = train(counts_h5ad, tmp_path / "started", "--init_from", str(source), "--max_steps", "1",
                    "--lr", "1e-12", "--refit_dispersion", "False")
    payload, own = load_checkpoint(started), load_checkpoint(source)
    record = payload["train_config"]["init_from_transfer"]
    assert payload["train_config"]["init_from"] == str(source) and payload["step"] == 1
    assert record["shared_genes"] == 40 and record["source_step"] == 12
    for key, value in own["state_dict"].items():  # one step at a negligible rate: still the source
        if key == "log_theta" or not value.dtype.is_floating_point or "running" in key:
            continue
        torch.testing.assert_close(payload["state_dict"][key], value, rtol=1e-4, atol=1e-6)
    scratch = load_checkpoint(train(counts_h5ad, tmp_path / "scratch", "--max_steps", "1", "--lr", "1e-12",
                                    "--refit_dispersion", "False"))
    weight = "encoder.0.weight"
    assert not torch.allclose(scratch["state_dict"][weight], own["state_dict"][weight])


def test_a_missing_or_mismatched_source_is_one_line(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path / "a", "--init_from", str(tmp_path / "missing.pt"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--init_from" in err and "missing.pt" in err and len(err.splitlines()) == 1
    source = train(counts_h5ad, tmp_path / "source")
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path / "b", "--init_from", str(source), "--latent_dim", "7")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--init_from" in err and "latent_dim 6, this run 7" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "b").glob("model_seed=*")) if (tmp_path / "b").exists() else True
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path / "c", "--init_from", str(tmp_path / "garbage.pt"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init_from:") and "garbage.pt" in err and len(err.splitlines()) == 1
