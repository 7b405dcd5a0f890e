"""Backed (streaming) data path: same values as in memory, bounded reads, block-shuffled resumable order."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cell_train
from guided_diffusion.data import files
from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import BatchSampler, BlockShuffledSampler, load_dataset
from synthetic import make_counts_adata
from VAE import VAE_train

BLOCK = 16


class RecordingMatrix:
    """Stands in for anndata's backed CSR dataset; records every row slice read and allows nothing else."""

    def __init__(self, inner, reads):
        self.inner, self.reads = inner, reads

    @property
    def shape(self):
        return self.inner.shape

    @property
    def dtype(self):
        return self.inner.dtype

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None, key
        self.reads.append(key.stop - key.start)
        return self.inner[key]


@pytest.fixture
def recorded_reads(monkeypatch):
    reads = []
    real = files.sparse_dataset
    monkeypatch.setattr(files, "sparse_dataset", lambda group: RecordingMatrix(real(group), reads))
    return reads


@pytest.fixture
def rich_h5ad(tmp_path):
    """300 cells with a counts layer, a raw copy and one empty cell."""
    adata = make_counts_adata(n_cells=300, n_genes=40, seed=4)
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata.copy()
    path = tmp_path / "rich.h5ad"
    adata.write_h5ad(path)
    return str(path)


@pytest.mark.parametrize("options", [
    {},
    {"layer": "counts", "filters": ["donor=donor1"]},
    {"layer": "raw", "filters": ["cell_type1=type_0,type_2"]},
])
def test_backed_rows_equal_in_memory_rows(rich_h5ad, options, recorded_reads):
    keys = ["cell_type1", "donor"]
    memory = load_dataset(rich_h5ad, label_keys=keys, **options)
    backed = load_dataset(rich_h5ad, label_keys=keys, backed=True, block_rows=BLOCK, **options)
    assert backed.is_backed and not memory.is_backed
    assert backed.n_cells == memory.n_cells and backed.genes == memory.genes
    np.testing.assert_array_equal(backed.size_factors, memory.size_factors)
    np.testing.assert_array_equal(backed.label_codes, memory.label_codes)
    assert backed.vocabularies == memory.vocabularies
    assert list(backed.obs_names) == memory.obs_names
    index = np.array([7, 3, 3, 120, 0, memory.n_cells - 1, 15, 16, 17])
    np.testing.assert_array_equal(backed.rows(index), memory.rows(index))
    np.testing.assert_array_equal(backed.rows(np.arange(backed.n_cells)), memory.rows(np.arange(memory.n_cells)))
    assert recorded_reads and max(recorded_reads) <= BLOCK
    backed.close()


def test_dense_stored_matrix_streams(tmp_path):
    adata = make_counts_adata(n_cells=60)
    adata.X = adata.X.toarray()
    path = tmp_path / "dense.h5ad"
    adata.write_h5ad(path)
    memory = load_dataset(str(path))
    backed = load_dataset(str(path), backed=True, block_rows=BLOCK)
    np.testing.assert_array_equal(backed.rows(np.arange(60)[::-1]), memory.rows(np.arange(60)[::-1]))


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.X.data.__setitem__(-1, np.nan), "NaN or infinite"),
    (lambda a: a.X.data.__setitem__(-1, -1.0), "negative values"),
    (lambda a: a.X.data.__setitem__(-1, 0.5), "--input_is_log True"),
])
def test_streamed_validation_reaches_the_last_block(tmp_path, mutate, message, recorded_reads):
    adata = make_counts_adata()
    mutate(adata)
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(UsageError, match=message):
        load_dataset(str(path), backed=True, block_rows=BLOCK)
    assert max(recorded_reads) <= BLOCK


def test_auto_mode_streams_above_the_threshold(counts_h5ad, monkeypatch):
    assert not load_dataset(str(counts_h5ad), backed="auto").is_backed
    monkeypatch.setattr(files, "BACKED_AUTO_BYTES", 100)
    assert files.stored_matrix_nbytes(str(counts_h5ad)) > 100
    assert load_dataset(str(counts_h5ad), backed="auto").is_backed


def test_column_stored_matrix_is_refused(tmp_path):
    adata = make_counts_adata()
    adata.X = sp.csc_matrix(adata.X)
    path = tmp_path / "csc.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(UsageError, match=r"column-wise \(CSC\).*--backed False"):
        load_dataset(str(path), backed=True)


def test_backed_errors_match_in_memory_errors(counts_h5ad):
    for backed in (False, True):
        with pytest.raises(UsageError, match="available columns: cell_type1, donor"):
            load_dataset(str(counts_h5ad), label_keys=["celltype"], backed=backed)
        with pytest.raises(UsageError, match="layer 'counts' not in the file"):
            load_dataset(str(counts_h5ad), layer="counts", backed=backed)
        with pytest.raises(UsageError, match="keeps no cells"):
            load_dataset(str(counts_h5ad), filters=["donor=donor0", "donor=donor1"], backed=backed)


def test_block_shuffled_sampler_is_random_sequential_and_resumable():
    indices = np.sort(np.random.default_rng(0).choice(1000, size=700, replace=False))
    sampler = BlockShuffledSampler(indices, batch_size=50, seed=3, block_rows=100)
    batches = [sampler.next_batch() for _ in range(42)]  # three epochs
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(np.concatenate(batches[14 * epoch:14 * (epoch + 1)])), indices)
    first_epoch = np.concatenate(batches[:14])
    blocks_in_order = first_epoch // 100
    assert np.count_nonzero(np.diff(blocks_in_order)) == len(np.unique(blocks_in_order)) - 1, "one visit per block"
    assert not np.array_equal(first_epoch, np.concatenate(batches[14:28]))
    assert not np.array_equal(np.unique(blocks_in_order), blocks_in_order[np.r_[True, np.diff(blocks_in_order) != 0]])

    replay = BlockShuffledSampler(indices, batch_size=50, seed=3, block_rows=100)
    for _ in range(20):
        replay.next_batch()
    resumed = BlockShuffledSampler(indices, batch_size=50, seed=3, block_rows=100)
    resumed.load_state_dict(replay.state_dict())
    for expected in batches[20:]:
        np.testing.assert_array_equal(resumed.next_batch(), expected)

    with pytest.raises(UsageError, match="in-memory loader"):
        resumed.load_state_dict(BatchSampler(indices, 50, 3).state_dict())
    with pytest.raises(UsageError, match="--backed True"):
        BatchSampler(indices, 50, 3).load_state_dict(replay.state_dict())


def train_autoencoder(h5ad, save_dir, *extra):
    return VAE_train.main(["--data_dir", str(h5ad), "--save_dir", str(save_dir), "--progress", "False",
                           "--batch_size", "32", "--hidden_dims", "32", "32", "32", "--latent_dim", "8",
                           "--backed", "True", "--block_rows", str(BLOCK), *extra])


def test_autoencoder_streams_and_resumes_exactly(tmp_path, counts_h5ad, recorded_reads, capsys):
    straight = train_autoencoder(counts_h5ad, tmp_path / "a", "--max_steps", "12", "--checkpoint_freq", "6")
    assert max(recorded_reads) <= BLOCK
    from VAE.autoencoder_checkpoint import AutoencoderCheckpoint

    assert AutoencoderCheckpoint.load(straight, with_training_state=True).training_state["sampler"]["block_rows"] == BLOCK
    half = str(tmp_path / "a" / "model_seed=0_step=6.pt")
    resumed = train_autoencoder(counts_h5ad, tmp_path / "b", "--max_steps", "12", "--checkpoint_freq", "6",
                                "--state_dict", half)
    first, second = load_checkpoint(straight)["state_dict"], load_checkpoint(resumed)["state_dict"]
    for name in first:
        assert torch.equal(first[name], second[name]), name

    with pytest.raises(SystemExit):
        train_autoencoder(counts_h5ad, tmp_path / "c", "--max_steps", "12", "--state_dict", half,
                          "--backed", "False")
    assert "resume with the same --backed and --block_rows" in capsys.readouterr().err


def test_diffusion_on_streamed_latents_equals_in_memory(tmp_path, counts_h5ad, recorded_reads):
    vae = train_autoencoder(counts_h5ad, tmp_path / "ae", "--max_steps", "4", "--backed", "False")
    recorded_reads.clear()
    common = ["--data_dir", str(counts_h5ad), "--vae_path", vae, "--save_dir", str(tmp_path / "diffusion"),
              "--lr_anneal_steps", "6", "--batch_size", "16", "--hidden_dims", "32", "32", "16",
              "--progress", "False", "--block_rows", str(BLOCK)]
    streamed = cell_train.main([*common, "--model_name", "streamed", "--backed", "True"])
    assert recorded_reads and max(recorded_reads) <= BLOCK
    in_memory = cell_train.main([*common, "--model_name", "in_memory", "--backed", "False"])
    first, second = load_checkpoint(streamed)["state_dict"], load_checkpoint(in_memory)["state_dict"]
    for name in first:
        assert torch.equal(first[name], second[name]), name
