"""One loader for every dataset: any .h5ad, label columns and layer given as flags.

The expression matrix stays sparse; rows are densified and normalized one batch at a time, so the
whole matrix is never a dense array. The dataset records everything a checkpoint must carry to
reproduce the input space: gene names in order, the normalization, and the label vocabularies in a
stable sorted order.

One module per concern (the names of all but ``flags`` are importable from ``guided_diffusion.data``):

| module | owns |
| --- | --- |
| ``files`` | the .h5ad file: path checks, reading it whole, opening it for streaming, ``--backed auto`` |
| ``values`` | the stored values: finite, non-negative, counts vs log-normalized, size factors |
| ``labels`` | label keys and values, ``--filter``, gene checks, :func:`format_values` for messages |
| ``dataset`` | :class:`CellDataset` over an in-memory or streamed row source; ``load_dataset`` |
| ``fingerprint`` | the training data's fingerprint (genes, cell names, values) and what differs between two |
| ``batches`` | batch samplers (shuffled, block-shuffled) and the train/validation split |
| ``variable_genes`` | the most variable genes (Seurat-flavour dispersion): the evaluation's feature space and the
  autoencoder's ``--encoder_genes`` |
| ``flags`` | the command-line layer of the data: ``add_data_args`` and ``dataset_from_args`` (import it from
  ``guided_diffusion.data.flags``; it is not re-exported here, so the library below the CLI never loads argparse types) |
"""
from guided_diffusion.data.batches import (BatchSampler, BlockShuffledSampler, make_batch_sampler,
                                           split_train_validation)
from guided_diffusion.data.dataset import (BLOCK_CACHE_SIZE, DEFAULT_BLOCK_ROWS, CellDataset, InMemoryRows,
                                           Normalization, RowWindowReader, StreamedRows,
                                           load_dataset)
from guided_diffusion.data.fingerprint import MatrixDigest, data_fingerprint, describe_change, fingerprint_differences
from guided_diffusion.data.files import BACKED_AUTO_BYTES, ObsColumns, read_h5ad, stored_matrix_nbytes, use_backed
from guided_diffusion.data.labels import (DEFAULT_LABEL_KEY, RESERVED_OBS_COLUMNS, check_genes, check_num_classes,
                                          format_values)
from guided_diffusion.data.normalize import TARGET_SUM
from guided_diffusion.data.values import ALLOW_COUNT_LIKE_FLAG, ValueScan

__all__ = [
    "ALLOW_COUNT_LIKE_FLAG", "BACKED_AUTO_BYTES", "BLOCK_CACHE_SIZE", "DEFAULT_BLOCK_ROWS", "DEFAULT_LABEL_KEY",
    "RESERVED_OBS_COLUMNS", "TARGET_SUM", "BatchSampler", "BlockShuffledSampler", "CellDataset", "InMemoryRows",
    "MatrixDigest", "Normalization", "ObsColumns", "RowWindowReader", "StreamedRows", "ValueScan", "check_genes", "check_num_classes", "data_fingerprint", "dataset_from_args",
    "describe_change", "fingerprint_differences", "format_values", "load_dataset", "make_batch_sampler", "read_h5ad",
    "split_train_validation", "stored_matrix_nbytes", "use_backed",
]
