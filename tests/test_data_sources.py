"""The loader's parts: the two row sources and obs tables behave alike, the flags reach the loader."""
import argparse

import h5py
import numpy as np
import pytest

from guided_diffusion.data import InMemoryRows, ObsColumns, StreamedRows, load_dataset
from guided_diffusion.data.flags import add_data_args, dataset_from_args
from guided_diffusion.data.files import FrameObs, open_backed, read_in_memory


@pytest.fixture
def both_sources(counts_h5ad):
    obs, matrix, genes = read_in_memory(str(counts_h5ad), "")
    file, backed_obs, backed_matrix, backed_genes = open_backed(str(counts_h5ad), "")
    assert genes == backed_genes
    yield (obs, InMemoryRows(matrix)), (backed_obs, StreamedRows(file, backed_matrix, block_rows=16))
    file.close()


def test_sources_give_the_same_blocks_rows_and_subsets(both_sources):
    (obs, memory), (backed_obs, streamed) = both_sources
    assert isinstance(obs, FrameObs) and isinstance(backed_obs, ObsColumns)
    assert memory.shape == streamed.shape
    stacked = np.vstack([block.toarray() for _, block in streamed.blocks()])
    np.testing.assert_array_equal(stacked, np.vstack([block.toarray() for _, block in memory.blocks()]))
    assert [start for start, _ in streamed.blocks()] == list(range(0, 150, 16))
    rows = np.array([140, 3, 77, 3, 0])
    np.testing.assert_array_equal(streamed.raw_rows(rows), memory.raw_rows(rows))
    subset = np.array([1, 5, 40, 41, 149])
    inner = np.array([0, 2, 4])
    np.testing.assert_array_equal(streamed.take(subset).take(inner).raw_rows(np.arange(3)),
                                  memory.take(subset[inner]).raw_rows(np.arange(3)))
    with pytest.raises(ValueError, match="increasing rows"):
        streamed.take(np.array([4, 0]))
    assert obs.columns == backed_obs.columns == ["cell_type1", "donor"]
    assert list(obs.take(subset).names()) == list(backed_obs.take(subset).names()) == [f"cell{i}" for i in subset]
    assert list(obs.take(subset)["donor"].astype(str)) == list(backed_obs.take(subset)["donor"].astype(str))


def test_a_failed_load_closes_the_file(counts_h5ad):
    with pytest.raises(Exception, match="keeps no cells"):
        load_dataset(str(counts_h5ad), filters=["donor=donor0", "donor=donor1"], backed=True)
    with h5py.File(counts_h5ad, "r+"):  # would fail while another handle holds the file open read-only
        pass


def test_dataset_from_args_passes_every_flag(counts_h5ad):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    args = parser.parse_args(["--data_dir", str(counts_h5ad), "--label_key", "donor", "--filter", "donor=donor1",
                              "--input_is_log", "True", "--allow_count_like_log", "True", "--backed", "True",
                              "--block_rows", "8"])
    dataset = dataset_from_args(args)
    assert dataset.label_keys == ["donor"] and dataset.vocabularies["donor"] == ["donor1"]
    assert dataset.normalization.input_is_log and dataset.is_backed and dataset.block_rows == 8
    dataset.close()
