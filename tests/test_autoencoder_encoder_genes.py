"""--encoder_genes: the encoder reads only the most variable genes of the training cells, the decoder still
outputs every gene; the genes are recorded in the checkpoint, a resumed run keeps them, old checkpoints read every
gene, bad values are refused."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.data import load_dataset
from synthetic import REPO_ROOT
from VAE import VAE_train
from VAE.autoencoder_training import encoder_gene_positions
from VAE.VAE_model import VAE, load_autoencoder


def train(counts_h5ad, save_dir, *extra):
    argv = ["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
            "--batch_size", "32", "--log_interval", "5", "--hidden_dims", "16", "--latent_dim", "6",
            "--max_steps", "10", "--checkpoint_freq", "10", "--decoder_label_key", "none", *extra]
    return VAE_train.main(argv)


def test_the_latent_depends_on_the_encoder_genes_only_and_the_output_covers_every_gene():
    torch.manual_seed(0)
    model = VAE(num_genes=30, latent_dim=6, hidden_dims=(16,), loss_ae="nb", encoder_genes=[7, 2, 11, 20]).eval()
    assert model.encoder_genes == [2, 7, 11, 20] and model.encoder[0].in_features == 4
    x = torch.rand(5, 30) * 3
    other = x.clone()
    other[:, [0, 1, 3, 29]] += 5.0  # genes the encoder does not read
    torch.testing.assert_close(model.encode(other), model.encode(x))
    moved = x.clone()
    moved[:, 11] += 5.0
    assert not torch.allclose(model.encode(moved), model.encode(x))
    # the same weights on the gene subset by hand
    full = VAE(num_genes=4, latent_dim=6, hidden_dims=(16,), loss_ae="nb").eval()
    full.encoder.load_state_dict(model.encoder.state_dict())
    torch.testing.assert_close(model.encode(x), full.encode(x[:, [2, 7, 11, 20]]))
    assert model.decode(model.encode(x)).shape == (5, 30)
    assert model.config()["encoder_genes"] == [2, 7, 11, 20]


@pytest.mark.parametrize("genes", [[1, 1, 2], [-1, 3], [0, 30]])
def test_positions_that_are_not_distinct_genes_are_refused(genes):
    with pytest.raises(Exception, match="--encoder_genes"):
        VAE(num_genes=30, encoder_genes=genes)


def variable_data(path, n_cells=120, n_genes=400, seed=0):
    """Counts with gene rates spread from 2 to 50 per cell, Poisson, except genes 3, 170 and 310, which are high in
    half the cells and low in the others: the three are the most variable by any dispersion measure (and enough
    genes at every mean that the Seurat flavour's mean bins hold many)."""
    rng = np.random.default_rng(seed)
    rates = np.tile(np.geomspace(2.0, 50.0, n_genes), (n_cells, 1))
    for gene in (3, 170, 310):
        rates[:, gene] *= np.where(rng.random(n_cells) < 0.5, 0.1, 1.9)
    adata = anndata.AnnData(sp.csr_matrix(rng.poisson(rates).astype(np.float32)),
                            obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                            var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    adata.write_h5ad(path)
    return path


def test_the_most_variable_genes_of_the_given_cells_are_chosen(tmp_path):
    dataset = load_dataset(str(variable_data(tmp_path / "v.h5ad")), label_keys=[])
    cells = np.arange(dataset.n_cells)
    assert encoder_gene_positions(dataset, cells, 3, seed=0) == [3, 170, 310]
    chosen = encoder_gene_positions(dataset, cells, 10, seed=0)
    assert len(chosen) == 10 and {3, 170, 310} <= set(chosen) and chosen == sorted(chosen)
    assert encoder_gene_positions(dataset, cells, 0, seed=0) == []
    assert encoder_gene_positions(dataset, cells, 400, seed=0) == []  # every gene: no subset
    # a seeded draw of the cells when there are more than max_cells: the same genes for the same seed
    assert encoder_gene_positions(dataset, cells, 3, seed=1, max_cells=60) == [3, 170, 310]


def test_the_checkpoint_records_the_genes_and_rebuilds_the_encoder(tmp_path):
    data = variable_data(tmp_path / "v.h5ad")
    path = train(data, tmp_path / "run", "--encoder_genes", "3")
    assert load_checkpoint(path)["model_config"]["encoder_genes"] == [3, 170, 310]
    autoencoder, _ = load_autoencoder(path)
    assert autoencoder.model.encoder[0].in_features == 3
    latents = autoencoder.encode_dataset(load_dataset(str(data), label_keys=[]), progress=False)
    assert latents.shape == (120, 6) and np.isfinite(latents).all()


def test_a_resumed_run_keeps_its_genes_and_refuses_another_count(tmp_path, capsys):
    data = variable_data(tmp_path / "v.h5ad")
    first = train(data, tmp_path / "a", "--encoder_genes", "3", "--max_steps", "6", "--checkpoint_freq", "6")
    resumed = train(data, tmp_path / "b", "--encoder_genes", "3", "--max_steps", "10", "--state_dict", first)
    assert load_checkpoint(resumed)["model_config"]["encoder_genes"] == [3, 170, 310]
    with pytest.raises(SystemExit):
        train(data, tmp_path / "c", "--encoder_genes", "5", "--max_steps", "10", "--state_dict", first)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --state_dict") and "encoder_genes" in line


def test_default_reads_every_gene_and_old_checkpoints_load(tmp_path, counts_h5ad):
    path = train(counts_h5ad, tmp_path)
    assert load_checkpoint(path)["model_config"]["encoder_genes"] == []
    for old in ("tests/data/legacy_v1/autoencoder.pt", "tests/data/schema_v2/model_seed=0_step=5.pt"):
        assert "encoder_genes" not in load_checkpoint(str(REPO_ROOT / old))["model_config"]
        autoencoder, _ = load_autoencoder(str(REPO_ROOT / old))
        assert autoencoder.model.encoder_genes == [] and autoencoder.model.encoder[0].in_features == \
            autoencoder.model.num_genes


def test_a_negative_count_is_refused(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as stopped:
        train(counts_h5ad, tmp_path, "--encoder_genes", "-3")
    assert stopped.value.code != 0 and "--encoder_genes" in capsys.readouterr().err.strip().splitlines()[-1]
