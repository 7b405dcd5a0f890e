"""The streamed h5ad writer at scale: the shared sparsity pattern, background writes and compression leave
the cells bit-identical, compressed files round-trip, and a failed write leaves nothing that looks complete."""
import os
import shutil
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import cell_sample
from benchmarks.baselines import writer_variant
from guided_diffusion.sampling import writer as h5ad_writer
from guided_diffusion.core import seed_streams
from guided_diffusion.data import Normalization
from guided_diffusion.sampling.writer import write_decoded_h5ad
from VAE.VAE_model import VAE, Autoencoder

N_CELLS, N_GENES, LATENT, CHUNK = 230, 60, 8, 64
LEGACY = Path(__file__).resolve().parent / "data" / "legacy_v1"


@pytest.fixture(scope="module")
def autoencoder():
    torch.manual_seed(0)
    model = VAE(N_GENES, latent_dim=LATENT, hidden_dims=(16,), loss_ae="nb").eval()
    return Autoencoder(model, [f"gene{i}" for i in range(N_GENES)], Normalization())


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(N_CELLS, LATENT)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["a", "b", "c"], N_CELLS))},
                       index=[f"generated_{i}" for i in range(N_CELLS)])
    library_sizes = rng.integers(200, 3000, N_CELLS).astype(np.float32)
    return latents, obs, library_sizes


def write(path, autoencoder, inputs, counts=True, **options):
    latents, obs, library_sizes = inputs
    return write_decoded_h5ad(str(path), autoencoder, latents, obs, {"run": {"seed": 5}}, chunk_size=CHUNK,
                              progress=False, library_sizes=library_sizes if counts else None, seed=5, **options)


def reference_counts(autoencoder, inputs, seed=5):
    """The counts by definition: chunk i drawn from the generator of (seed, COUNT_DRAWS, i)."""
    latents, _, library_sizes = inputs
    rows = []
    with torch.inference_mode():
        for number, start in enumerate(range(0, N_CELLS, CHUNK)):
            generator = seed_streams.torch_generator(seed, seed_streams.COUNT_DRAWS, number)
            drawn = autoencoder.model.sample_counts(torch.as_tensor(latents[start:start + CHUNK]),
                                                    torch.as_tensor(library_sizes[start:start + CHUNK]), generator)
            rows.append(drawn.to_dense().numpy())
    return np.concatenate(rows)


def assert_same_file_contents(first, second):
    a, b = anndata.read_h5ad(first), anndata.read_h5ad(second)
    for matrix_a, matrix_b in ((a.X, b.X), (a.layers.get("counts"), b.layers.get("counts"))):
        if matrix_a is None:
            assert matrix_b is None
            continue
        assert type(matrix_a) is type(matrix_b) and matrix_a.dtype == matrix_b.dtype
        dense_a = matrix_a.toarray() if hasattr(matrix_a, "toarray") else matrix_a
        dense_b = matrix_b.toarray() if hasattr(matrix_b, "toarray") else matrix_b
        assert np.array_equal(dense_a, dense_b)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert sorted(a.uns) == sorted(b.uns)


def test_counts_are_the_seeded_draws_and_x_their_log_normalization(tmp_path, autoencoder, inputs):
    write(tmp_path / "g.h5ad", autoencoder, inputs)
    adata = anndata.read_h5ad(tmp_path / "g.h5ad")
    counts = reference_counts(autoencoder, inputs)
    assert counts.sum() > 0
    assert np.array_equal(adata.layers["counts"].toarray(), counts)
    totals = counts.sum(axis=1, dtype=np.float64)
    expected = np.log1p(counts * (1e4 / np.maximum(totals, 1e-12))[:, None]).astype(np.float32)
    np.testing.assert_allclose(adata.X.toarray(), expected, rtol=1e-6)
    assert np.array_equal(adata.obs["library_size"].to_numpy(), totals.astype(np.float32))


def test_shared_pattern_and_background_writes_give_the_previous_layouts_cells(tmp_path, autoencoder, inputs):
    with writer_variant(share_pattern=False):  # the layout before: X's indices and indptr stored as copies
        previous = write(tmp_path / "previous.h5ad", autoencoder, inputs, background_writes=False)
    current = write(tmp_path / "current.h5ad", autoencoder, inputs)
    assert previous == current
    assert_same_file_contents(tmp_path / "previous.h5ad", tmp_path / "current.h5ad")
    with h5py.File(tmp_path / "current.h5ad") as store:
        assert store["X/indices"] == store["layers/counts/indices"]  # one dataset, two names
        assert store["X/indptr"] == store["layers/counts/indptr"]
    with h5py.File(tmp_path / "previous.h5ad") as store:
        assert store["X/indices"] != store["layers/counts/indices"]
    assert os.path.getsize(tmp_path / "current.h5ad") < os.path.getsize(tmp_path / "previous.h5ad")


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
@pytest.mark.parametrize("counts", [True, False])
def test_compressed_files_round_trip(tmp_path, autoencoder, inputs, compression, counts):
    plain = write(tmp_path / "plain.h5ad", autoencoder, inputs, counts=counts, compression="none")
    packed = write(tmp_path / "packed.h5ad", autoencoder, inputs, counts=counts, compression=compression)
    assert plain == packed
    assert_same_file_contents(tmp_path / "plain.h5ad", tmp_path / "packed.h5ad")
    name = "layers/counts/data" if counts else "X"
    with h5py.File(tmp_path / "packed.h5ad") as store:
        assert store[name].compression == compression
    with h5py.File(tmp_path / "plain.h5ad") as store:
        assert store[name].compression is None
    backed = anndata.read_h5ad(tmp_path / "packed.h5ad", backed="r")
    assert backed.X[:3].shape == (3, N_GENES)


def test_an_unknown_compression_is_refused(tmp_path, autoencoder, inputs):
    with pytest.raises(ValueError, match="compression must be one of"):
        write(tmp_path / "g.h5ad", autoencoder, inputs, compression="zstd")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("background_writes", [True, False])
def test_a_failed_write_leaves_no_output(tmp_path, autoencoder, inputs, monkeypatch, background_writes):
    appended = []
    original = h5ad_writer.StreamedCsrMatrix.append

    def failing_append(self, block):
        appended.append(block.shape[0])
        if len(appended) == 3:
            raise OSError("disk full")
        return original(self, block)

    monkeypatch.setattr(h5ad_writer.StreamedCsrMatrix, "append", failing_append)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "g.h5ad", autoencoder, inputs, background_writes=background_writes)
    assert not os.listdir(tmp_path)  # neither the file nor its temporary


def test_a_refused_chunk_mid_run_leaves_no_output(tmp_path, autoencoder, inputs, monkeypatch):
    """Chunks already queued to the writer thread when a later chunk is refused do not survive either."""
    drawn = []
    original = h5ad_writer._draw_counts

    def refusing_draws(*args):
        drawn.append(1)
        if len(drawn) == 3:
            raise h5ad_writer.NonFiniteOutput("drawn counts")
        return original(*args)

    monkeypatch.setattr(h5ad_writer, "_draw_counts", refusing_draws)
    with pytest.raises(h5ad_writer.NonFiniteOutput):
        write(tmp_path / "g.h5ad", autoencoder, inputs)
    assert not os.listdir(tmp_path)


def test_cell_sample_compression_flag(tmp_path):
    for name in ("model000004.pt", "ema_0.9999_000004.pt", "autoencoder.pt"):
        shutil.copy(LEGACY / name, tmp_path / name)
    outputs = {}
    for compression in ("none", "gzip"):
        out = tmp_path / compression
        cell_sample.main(["--model_path", str(tmp_path / "model000004.pt"), "--sample_dir", str(out),
                          "--vae_path", str(tmp_path / "autoencoder.pt"), "--num_samples", "3",
                          "--timestep_respacing", "10", "--progress", "False", "--compression", compression])
        outputs[compression] = out / "generated.h5ad"
        assert (out / "manifest.json").exists()
    assert_same_file_contents(outputs["none"], outputs["gzip"])
    with h5py.File(outputs["gzip"]) as store:
        matrix = store["X"]  # dense with this (mse) autoencoder's decoded means, sparse with count draws
        assert (matrix if isinstance(matrix, h5py.Dataset) else matrix["data"]).compression == "gzip"


def test_cell_sample_refuses_an_unknown_compression(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cell_sample.main(["--model_path", str(LEGACY / "model000004.pt"), "--sample_dir", str(tmp_path / "o"),
                          "--compression", "zstd"])
    assert exit_info.value.code == 2
    assert "--compression" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
