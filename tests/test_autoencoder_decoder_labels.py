"""--decoder_label_key: a decoder that reads each cell's labels beside its latent (a learned shift per label of
every decoder layer, summed over the keys). Zero effects equal the plain decoder; two keys' shifts add; count
draws and the writer use each cell's labels; the checkpoint records the keys and their values; unknown values,
missing labels and a diffusion model not conditioned on a key are one-line errors; old checkpoints load as
plain decoders."""
import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import cell_train
from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.core.errors import UsageError
from guided_diffusion.sampling.writer import decode_to_anndata, write_decoded_h5ad
from synthetic import REPO_ROOT
from VAE import VAE_train
from VAE.count_model import sample_negative_binomial_screened
from VAE.VAE_model import VAE, load_autoencoder

LABELS = ["a", "b", "c"]


def conditioned(seed=0, loss_ae="nb"):
    torch.manual_seed(seed)
    return VAE(num_genes=30, latent_dim=6, hidden_dims=(16,), loss_ae=loss_ae, decoder_label_keys=["cell_type1"],
               decoder_labels=[LABELS]).eval()


def randomize_effects(model):
    with torch.no_grad():
        for effect in model.decoder_label_effects:
            effect.weight.normal_()


def refused_diffusion_training(data, vae, tmp_path, capsys):
    """cell_train.py on ``data`` with the autoencoder ``vae``, which must stop with a non-zero exit; its last
    stderr line."""
    with pytest.raises(SystemExit) as stopped:
        cell_train.main(["--data_dir", str(data), "--vae_path", vae, "--save_dir", str(tmp_path / "d"),
                         "--model_name", "m", "--lr_anneal_steps", "2", "--progress", "False"])
    assert stopped.value.code != 0
    return capsys.readouterr().err.strip().splitlines()[-1]


def train(counts_h5ad, save_dir, *extra):
    return VAE_train.main(["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
                           "--batch_size", "32", "--log_interval", "5", "--hidden_dims", "16", "--latent_dim", "6",
                           "--max_steps", "60", "--checkpoint_freq", "60", "--lr", "1e-2", *extra])


def test_zero_effects_are_the_plain_decoder_and_each_label_shifts_every_layer():
    model = conditioned()
    plain = VAE(num_genes=30, latent_dim=6, hidden_dims=(16,), loss_ae="nb").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "label_effects" not in k})
    latent = torch.nn.functional.normalize(torch.randn(7, 6), dim=1)
    codes = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_allclose(model.decode(latent, codes).numpy(), plain.decode(latent).numpy(), rtol=1e-6)
    randomize_effects(model)
    with torch.no_grad():  # by hand: Linear + shift, BatchNorm, PReLU, Linear + shift
        first, norm, act, last = model.decoder
        hidden = act(norm(first(latent) + model.decoder_label_effects[0].weight[codes]))
        logits = last(hidden) + model.decoder_label_effects[1].weight[codes]
    expected = torch.log1p(torch.softmax(logits, dim=1) * model.target_sum)
    np.testing.assert_allclose(model.decode(latent, codes).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    same = latent[:1].repeat(3, 1)
    decoded = model.decode(same, torch.tensor([0, 1, 2])).numpy()
    assert not np.allclose(decoded[0], decoded[1]) and not np.allclose(decoded[1], decoded[2])


def test_count_draws_use_each_cells_label():
    model = conditioned()
    randomize_effects(model)
    latent = torch.nn.functional.normalize(torch.randn(5, 6), dim=1)
    codes, totals = torch.tensor([2, 0, 1, 1, 0]), torch.full((5,), 500.0)
    with torch.inference_mode():  # the draws are inference tensors
        drawn = model.sample_counts(latent, totals, torch.Generator().manual_seed(3), labels=codes).to_dense()
        logits = model.run_decoder(latent, codes)
        expected = sample_negative_binomial_screened(logits, totals, torch.exp(model.log_theta),
                                                     torch.Generator().manual_seed(3)).to_dense()
    assert torch.equal(drawn, expected)


def test_missing_or_bad_labels_are_refused():
    model = conditioned()
    latent = torch.nn.functional.normalize(torch.randn(3, 6), dim=1)
    with pytest.raises(UsageError, match="cell_type1"):
        model.decode(latent)
    with pytest.raises(UsageError, match="0..2"):
        model.decode(latent, torch.tensor([0, 1, 3]))
    with pytest.raises(UsageError, match=r"shape \(2, 1\) for 3 latents"):
        model.decode(latent, torch.tensor([0, 1]))
    with pytest.raises(UsageError):
        VAE(num_genes=30, decoder_label_keys=["cell_type1"])  # a key without values
    with pytest.raises(UsageError, match="twice"):
        VAE(num_genes=30, decoder_label_keys=["a", "a"], decoder_labels=[["x"], ["y"]])


def test_training_records_the_key_and_learns_a_label_effect(tmp_path, counts_h5ad):
    path = train(counts_h5ad, tmp_path, "--decoder_label_key", "cell_type1")
    config = load_checkpoint(path)["model_config"]
    assert config["decoder_label_keys"] == ["cell_type1"] and config["decoder_labels"] == [["type_0", "type_1",
                                                                                          "type_2"]]
    autoencoder, _ = load_autoencoder(path)
    model = autoencoder.model
    assert model.reads_labels and all(e.weight.abs().max() > 0 for e in model.decoder_label_effects)
    # the same latent decoded as each type: each type's own gene block (synthetic.make_counts_adata) comes out
    # highest under its own label
    latent = torch.nn.functional.normalize(torch.randn(1, 6), dim=1).repeat(3, 1)
    decoded = model.decode(latent, torch.tensor([0, 1, 2])).numpy()
    block = 40 // 4
    for t in range(3):
        own = decoded[:, t * block:(t + 1) * block].mean(axis=1)
        assert own.argmax() == t


def test_the_writer_decodes_each_cell_with_its_obs_label(tmp_path, counts_h5ad):
    autoencoder, _ = load_autoencoder(train(counts_h5ad, tmp_path / "ae", "--decoder_label_key", "cell_type1"))
    latents = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32)
    latents /= np.linalg.norm(latents, axis=1, keepdims=True)
    values = ["type_2", "type_0", "type_1", "type_1", "type_0", "type_2"]
    obs = pd.DataFrame({"cell_type1": pd.Categorical(values)}, index=[f"g{i}" for i in range(6)])
    write_decoded_h5ad(str(tmp_path / "means.h5ad"), autoencoder, latents, obs, {}, progress=False)
    codes = torch.tensor([int(v[-1]) for v in values])
    expected = autoencoder.model.decode(torch.from_numpy(latents), codes).numpy()
    np.testing.assert_allclose(anndata.read_h5ad(tmp_path / "means.h5ad").X, expected, rtol=1e-5, atol=1e-6)
    in_memory, _ = decode_to_anndata(autoencoder, latents, obs, {}, progress=False)
    np.testing.assert_allclose(in_memory.X, expected, rtol=1e-5, atol=1e-6)
    totals = np.full(6, 300.0, dtype=np.float32)
    written, _ = decode_to_anndata(autoencoder, latents, obs, {}, progress=False, library_sizes=totals, seed=4)
    write_decoded_h5ad(str(tmp_path / "counts.h5ad"), autoencoder, latents, obs, {}, progress=False,
                       library_sizes=totals, seed=4)
    assert (anndata.read_h5ad(tmp_path / "counts.h5ad").layers["counts"] != written.layers["counts"]).nnz == 0
    with pytest.raises(UsageError, match="no 'cell_type1' column"):
        write_decoded_h5ad(str(tmp_path / "x.h5ad"), autoencoder, latents, obs.rename(columns={"cell_type1": "t"}),
                           {}, progress=False)
    bad = obs.assign(cell_type1=pd.Categorical(["type_9"] * 6))
    with pytest.raises(UsageError, match="type_9"):
        write_decoded_h5ad(str(tmp_path / "x.h5ad"), autoencoder, latents, bad, {}, progress=False)
    assert not (tmp_path / "x.h5ad").exists()


def test_the_diffusion_model_must_be_conditioned_on_the_decoders_key(tmp_path, counts_h5ad, capsys):
    vae = train(counts_h5ad, tmp_path / "ae", "--decoder_label_key", "donor")
    last = refused_diffusion_training(counts_h5ad, vae, tmp_path, capsys)
    assert "--label_key donor" in last and "Traceback" not in last


def test_a_missing_label_column_is_a_one_line_error(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as stopped:
        train(counts_h5ad, tmp_path, "--decoder_label_key", "tissue")
    assert stopped.value.code != 0
    assert "'tissue' not in obs" in capsys.readouterr().err.strip().splitlines()[-1]


def test_old_checkpoints_load_as_plain_decoders():
    for old in ("tests/data/legacy_v1/autoencoder.pt", "tests/data/schema_v2/model_seed=0_step=5.pt"):
        assert "decoder_label_key" not in load_checkpoint(str(REPO_ROOT / old))["model_config"]
        autoencoder, _ = load_autoencoder(str(REPO_ROOT / old))
        assert not autoencoder.model.reads_labels
        assert autoencoder.decoder_codes(pd.DataFrame(index=["x"])) is None


def test_a_diffusion_dataset_with_types_the_decoder_never_saw_is_refused(tmp_path, counts_adata, capsys):
    full = tmp_path / "full.h5ad"
    counts_adata.write_h5ad(full)
    kept = counts_adata[counts_adata.obs["cell_type1"].astype(str) != "type_2"].copy()
    kept.write_h5ad(tmp_path / "kept.h5ad")
    vae = train(tmp_path / "kept.h5ad", tmp_path / "ae", "--decoder_label_key", "cell_type1")
    last = refused_diffusion_training(full, vae, tmp_path, capsys)
    assert "type_2" in last and "Traceback" not in last


def test_two_keys_shifts_add_and_each_cell_needs_both():
    torch.manual_seed(0)
    model = VAE(num_genes=30, latent_dim=6, hidden_dims=(16,), loss_ae="nb", decoder_label_keys=["cell_type1", "donor"],
                decoder_labels=[LABELS, ["d0", "d1"]]).eval()
    randomize_effects(model)
    latent = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    codes = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0]])
    with torch.no_grad():  # by hand: each layer's shift is the type's row plus the donor's (after the 3 types)
        first, norm, act, last = model.decoder
        tables = [effect.weight for effect in model.decoder_label_effects]
        hidden = act(norm(first(latent) + tables[0][codes[:, 0]] + tables[0][3 + codes[:, 1]]))
        logits = last(hidden) + tables[1][codes[:, 0]] + tables[1][3 + codes[:, 1]]
    expected = torch.log1p(torch.softmax(logits, dim=1) * model.target_sum)
    np.testing.assert_allclose(model.decode(latent, codes).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        totals = torch.full((4,), 300.0)
        drawn = model.sample_counts(latent, totals, torch.Generator().manual_seed(1), labels=codes).to_dense()
        direct = sample_negative_binomial_screened(model.run_decoder(latent, codes), totals, torch.exp(model.log_theta),
                                                   torch.Generator().manual_seed(1)).to_dense()
    assert torch.equal(drawn, direct)
    with pytest.raises(UsageError, match="0..1"):
        model.decode(latent, torch.tensor([[0, 2], [0, 0], [0, 0], [0, 0]]))
    with pytest.raises(UsageError, match="2 label key"):
        model.decode(latent, codes[:, 0])


def test_a_decoder_reading_two_keys_trains_writes_and_refuses_an_open_key(tmp_path, counts_h5ad, capsys):
    path = train(counts_h5ad, tmp_path / "ae", "--decoder_label_key", "cell_type1,donor")
    config = load_checkpoint(path)["model_config"]
    assert config["decoder_label_keys"] == ["cell_type1", "donor"] and len(config["decoder_labels"][1]) >= 2
    autoencoder, _ = load_autoencoder(path)
    donors = autoencoder.model.decoder_labels[1]
    obs = pd.DataFrame({"cell_type1": pd.Categorical(["type_0", "type_2", "type_1"]),
                        "donor": pd.Categorical([donors[0], donors[1], donors[0]])}, index=["a", "b", "c"])
    codes = autoencoder.decoder_codes(obs)
    assert codes.shape == (3, 2) and codes[:, 1].tolist() == [0, 1, 0]
    latents = torch.nn.functional.normalize(torch.randn(3, 6), dim=1).numpy()
    decoded, _ = decode_to_anndata(autoencoder, latents, obs, {}, progress=False)
    np.testing.assert_allclose(decoded.X, autoencoder.model.decode(torch.from_numpy(latents), codes).numpy(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="no 'donor' column"):
        autoencoder.decoder_codes(obs.drop(columns="donor"))
    refused_diffusion_training(counts_h5ad, path, tmp_path, capsys)  # it must be conditioned on both keys
    with pytest.raises(SystemExit):
        train(counts_h5ad, tmp_path / "bad", "--decoder_label_key", "cell_type1,,donor")


def test_a_single_key_record_loads_as_one_key():
    model = conditioned()
    config = {k: v for k, v in model.config().items() if k not in ("decoder_label_keys", "decoder_labels")}
    single = VAE.complete_config({**config, "decoder_label_key": "cell_type1", "decoder_labels": LABELS})
    assert single["decoder_label_keys"] == ["cell_type1"] and single["decoder_labels"] == [LABELS]
    rebuilt = VAE(**single)
    rebuilt.load_state_dict(model.state_dict())
    none = VAE.complete_config({**config, "decoder_label_key": None, "decoder_labels": []})
    assert none["decoder_label_keys"] == [] and not VAE(**none).reads_labels


def test_auto_names_the_flag_when_cell_type1_has_missing_values(tmp_path, counts_adata, capsys):
    types = counts_adata.obs["cell_type1"].astype(object).to_numpy()
    types[:4] = np.nan
    counts_adata.obs["cell_type1"] = pd.Categorical(types)
    counts_adata.write_h5ad(tmp_path / "gaps.h5ad")
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path / "gaps.h5ad", tmp_path / "auto")
    assert stopped.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "missing for 4 cells" in last and "--decoder_label_key none" in last
    path = train(tmp_path / "gaps.h5ad", tmp_path / "none", "--decoder_label_key", "none")
    assert load_checkpoint(path)["model_config"]["decoder_label_keys"] == []
