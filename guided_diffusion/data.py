"""One loader for every dataset: any .h5ad, label columns and layer given as flags.

The expression matrix stays sparse; rows are densified and normalized one batch at a time
(``CellDataset.rows``), so the whole matrix is never turned into a dense array. The dataset records
everything a checkpoint must carry to reproduce the input space: gene names in order, the
normalization, and the label vocabularies in a stable sorted order.
"""
import os
from dataclasses import asdict, dataclass

import anndata
import h5py
import numpy as np
import scipy.sparse as sp

from .cli import UsageError, str2bool

DEFAULT_LABEL_KEY = "cell_type1"
TARGET_SUM = 1e4


@dataclass
class Normalization:
    """How raw values become the model's input: normalize_total(target_sum) then log1p.

    ``input_is_log`` means the stored values are already log-normalized and are used as they are.
    """

    input_is_log: bool = False
    target_sum: float = TARGET_SUM
    layer: str = ""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)


def add_data_args(parser, labels=True):
    """The loader's flags, shared by every script that reads an h5ad."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", required=True, help="path to the .h5ad file")
    if labels:
        group.add_argument("--label_key", action="append", default=None,
                           help=f"obs column with the labels; repeat for several conditions "
                                f"(default: {DEFAULT_LABEL_KEY})")
    group.add_argument("--layer", default="",
                       help="read this layer instead of X ('raw' reads adata.raw)")
    group.add_argument("--input_is_log", type=str2bool, default=False,
                       help="True if the values are already log-normalized (default: raw counts)")
    group.add_argument("--filter", action="append", default=[], metavar="KEY=V1[,V2]",
                       help="keep only cells whose obs[KEY] is one of the values; repeatable")
    return group


def dataset_from_args(args, labels=True):
    return load_dataset(args.data_dir, label_keys=args.label_key if labels else [],
                        layer=args.layer, input_is_log=args.input_is_log, filters=args.filter)


def read_h5ad(path):
    """Read an .h5ad file, turning a missing or malformed file into a one-line UsageError."""
    if not os.path.exists(path):
        raise UsageError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; --data_dir takes the path of an .h5ad file")
    if not h5py.is_hdf5(path):
        raise UsageError(f"{path} is not an .h5ad file (not HDF5)")
    try:
        return anndata.read_h5ad(path)
    except Exception as error:  # anndata raises many types for malformed files
        raise UsageError(f"cannot read {path} as AnnData: {type(error).__name__}: {error}") from error


def _select_matrix(adata, layer):
    if not layer:
        return adata.X, list(map(str, adata.var_names))
    if layer == "raw":
        if adata.raw is None:
            raise UsageError("--layer raw was given but the file has no adata.raw")
        return adata.raw.X, list(map(str, adata.raw.var_names))
    if layer not in adata.layers:
        raise UsageError(f"layer {layer!r} not in the file; available layers: "
                         f"{', '.join(adata.layers.keys()) or '(none)'}")
    return adata.layers[layer], list(map(str, adata.var_names))


def _parse_filters(filters, obs):
    keep = np.ones(len(obs), dtype=bool)
    for item in filters or []:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--filter takes KEY=VALUE[,VALUE], got {item!r}")
        if key not in obs.columns:
            raise UsageError(f"--filter key {key!r} is not an obs column; available: {', '.join(obs.columns)}")
        keep &= obs[key].astype(str).isin(values.split(",")).to_numpy()
    return keep


def validate_values(matrix, input_is_log, chunk_rows=65536):
    """Check values are finite, non-negative and (for counts) integers; one clear error otherwise."""
    for start in range(0, matrix.shape[0], chunk_rows):
        block = matrix[start:start + chunk_rows]
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if values.size == 0:
            continue
        if not np.all(np.isfinite(values)):
            raise UsageError("the expression matrix contains NaN or infinite values; clean the file first")
        if values.min() < 0:
            raise UsageError("the expression matrix contains negative values; the loader expects raw counts "
                             "or log-normalized values (scaled/centered data cannot be used)")
        if not input_is_log and not np.all(values == np.round(values)):
            raise UsageError("the expression matrix has non-integer values but raw counts are expected; "
                             "if it is already log-normalized, pass --input_is_log True")


class CellDataset:
    """Cells x genes expression (sparse, as stored) with integer label codes per label key."""

    def __init__(self, matrix, genes, label_keys, label_codes, vocabularies, normalization, obs_names=None):
        self.matrix = matrix
        self.genes = list(genes)
        self.label_keys = list(label_keys)
        self.label_codes = label_codes
        self.vocabularies = vocabularies
        self.normalization = normalization
        self.obs_names = obs_names
        if normalization.input_is_log:
            self.size_factors = None
        else:
            totals = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
            totals[totals == 0] = 1.0
            self.size_factors = (normalization.target_sum / totals).astype(np.float32)

    @property
    def n_cells(self):
        return self.matrix.shape[0]

    @property
    def n_genes(self):
        return self.matrix.shape[1]

    @property
    def num_classes(self):
        return [len(self.vocabularies[key]) for key in self.label_keys]

    def rows(self, index):
        """Dense float32 model input (log-normalized) for the given row indices."""
        index = np.asarray(index)
        order = np.argsort(index, kind="stable")
        block = self.matrix[index[order]]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        block = block.astype(np.float32, copy=False)
        dense = np.empty_like(block)
        dense[order] = block
        if self.size_factors is not None:
            dense *= self.size_factors[index][:, None]
            np.log1p(dense, out=dense)
        return dense

    def label_strings(self, key, codes):
        vocabulary = self.vocabularies[key]
        return [vocabulary[code] for code in codes]


def load_dataset(path, label_keys=None, layer="", input_is_log=False, filters=None, require_labels=True):
    """Read ``path`` into a :class:`CellDataset`.

    ``label_keys``: obs columns used as conditions, in order; None means the default
    ``cell_type1`` when present. An empty list loads no labels.
    """
    adata = read_h5ad(path)
    if label_keys is None:
        if DEFAULT_LABEL_KEY in adata.obs.columns:
            label_keys = [DEFAULT_LABEL_KEY]
        elif require_labels:
            raise UsageError(f"no --label_key given and obs has no {DEFAULT_LABEL_KEY!r} column; "
                             f"choose one of: {', '.join(adata.obs.columns) or '(no obs columns)'}")
        else:
            label_keys = []
    for key in label_keys:
        if key not in adata.obs.columns:
            raise UsageError(f"label key {key!r} not in obs; available columns: "
                             f"{', '.join(adata.obs.columns) or '(none)'}")
    if len(set(label_keys)) != len(label_keys):
        raise UsageError(f"--label_key given twice: {label_keys}")

    matrix, genes = _select_matrix(adata, layer)
    if matrix.shape[0] == 0:
        raise UsageError(f"{path} has zero cells")
    if matrix.shape[1] == 0:
        raise UsageError(f"{path} has zero genes")
    if len(set(genes)) != len(genes):
        raise UsageError(f"{path} has duplicate gene names; make them unique (adata.var_names_make_unique())")
    keep = _parse_filters(filters, adata.obs)
    if not keep.any():
        raise UsageError(f"--filter {' '.join(filters)} keeps no cells")
    obs = adata.obs[keep]
    if not keep.all():
        matrix = matrix[np.flatnonzero(keep)]
    matrix = sp.csr_matrix(matrix) if not sp.issparse(matrix) else matrix.tocsr()
    validate_values(matrix, input_is_log)

    vocabularies, codes = {}, np.zeros((matrix.shape[0], len(label_keys)), dtype=np.int64)
    for column, key in enumerate(label_keys):
        values = obs[key]
        missing = values.isna().to_numpy()
        if missing.any():
            raise UsageError(f"label key {key!r} is missing for {int(missing.sum())} cells; "
                             f"drop them or fill the column")
        strings = values.astype(str).to_numpy()
        vocabulary = sorted(set(strings))
        vocabularies[key] = vocabulary
        lookup = {name: code for code, name in enumerate(vocabulary)}
        codes[:, column] = [lookup[name] for name in strings]

    normalization = Normalization(input_is_log=bool(input_is_log), layer=layer or "")
    return CellDataset(matrix, genes, label_keys, codes, vocabularies, normalization,
                       obs_names=list(map(str, obs.index)))


def check_num_classes(num_classes, dataset):
    """``--num_classes`` (one number per label key) must agree with the data's vocabularies."""
    if num_classes is None:
        return
    found = dataset.num_classes
    if list(num_classes) != found:
        detail = ", ".join(f"{key}: {n}" for key, n in zip(dataset.label_keys, found))
        raise UsageError(f"--num_classes {' '.join(map(str, num_classes))} contradicts the data ({detail}); "
                         f"omit it or fix the value")


def check_genes(expected, found, what="the autoencoder checkpoint"):
    """Data genes must equal the checkpoint's genes, in order; say how many differ and which first."""
    if list(expected) == list(found):
        return
    expected_set, found_set = set(expected), set(found)
    missing = [g for g in expected if g not in found_set]
    extra = [g for g in found if g not in expected_set]
    if not missing and not extra:
        raise UsageError(f"the data has the genes of {what} but in a different order; reorder with adata[:, genes]")
    parts = [f"the data has {len(found)} genes, {what} {len(expected)}"]
    if missing:
        parts.append(f"{len(missing)} missing from the data (first: {', '.join(missing[:5])})")
    if extra:
        parts.append(f"{len(extra)} not in {what} (first: {', '.join(extra[:5])})")
    raise UsageError("; ".join(parts))


class BatchSampler:
    """Endless shuffled batches over a set of indices, resumable exactly from ``state_dict``.

    Each epoch's permutation derives from (seed, epoch) alone, so the position (epoch, offset)
    is the whole state.
    """

    def __init__(self, indices, batch_size, seed):
        self.indices = np.asarray(indices)
        if len(self.indices) == 0:
            raise UsageError("no cells to train on")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._permutation = self._permute(0)

    def _permute(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        return self.indices[rng.permutation(len(self.indices))]

    def next_batch(self):
        parts, needed = [], self.batch_size
        while needed > 0:
            if self.offset >= len(self._permutation):
                self.epoch += 1
                self.offset = 0
                self._permutation = self._permute(self.epoch)
            take = self._permutation[self.offset:self.offset + needed]
            parts.append(take)
            self.offset += len(take)
            needed -= len(take)
        return np.concatenate(parts)

    def state_dict(self):
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state):
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._permutation = self._permute(self.epoch)


def split_train_validation(n_cells, val_fraction, seed):
    """Deterministic held-out split; at least one training cell and, if asked, one validation cell."""
    rng = np.random.default_rng([seed, 12345])
    order = rng.permutation(n_cells)
    n_val = int(round(n_cells * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), n_cells - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
