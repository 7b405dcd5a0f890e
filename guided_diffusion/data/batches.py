"""Training batches and the held-out split.

:class:`BatchSampler` gives endless shuffled batches; :class:`BlockShuffledSampler` keeps the cells of
one row block together so a streamed dataset reads sequentially. Both resume exactly from their
``state_dict`` (the position (epoch, offset) derives every later batch).
"""
import math

import numpy as np

from guided_diffusion.core.errors import UsageError


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

    def _check_order_kind(self, state):
        if state.get("block_rows") is not None:
            raise UsageError(f"the checkpoint was trained with --backed True (block-shuffled order, --block_rows "
                             f"{state['block_rows']}); resume with the same --backed and --block_rows")

    def load_state_dict(self, state):
        self._check_order_kind(state)
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._permutation = self._permute(self.epoch)


class BlockShuffledSampler(BatchSampler):
    """:class:`BatchSampler` whose epochs keep cells of one block of ``block_rows`` together.

    An epoch visits the blocks (cells ``[b * block_rows, (b + 1) * block_rows)`` that hold training
    indices) in a random order and the indices within each block in a random order, both drawn from
    (seed, epoch) alone, so reads stay sequential and the state is still (epoch, offset).
    """

    def __init__(self, indices, batch_size, seed, block_rows):
        self.block_rows = int(block_rows)
        super().__init__(np.sort(np.asarray(indices)), batch_size, seed)

    def _permute(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        _, block_number = np.unique(self.indices // self.block_rows, return_inverse=True)
        block_position = rng.permutation(int(block_number.max()) + 1)
        within = rng.random(len(self.indices))
        return self.indices[np.lexsort((within, block_position[block_number]))]

    def state_dict(self):
        return dict(super().state_dict(), block_rows=self.block_rows)

    def _check_order_kind(self, state):
        if state.get("block_rows") != self.block_rows:
            trained = (f"--backed True --block_rows {state['block_rows']}" if state.get("block_rows") is not None
                       else "the in-memory loader (--backed False)")
            raise UsageError(f"the checkpoint was trained with {trained}, this run streams with --block_rows "
                             f"{self.block_rows}; resume with the same --backed and --block_rows")


def make_batch_sampler(dataset, indices, batch_size, seed):
    """Block-shuffled batches for a backed dataset, fully shuffled ones in memory."""
    if dataset.is_backed:
        return BlockShuffledSampler(indices, batch_size, seed, dataset.block_rows)
    return BatchSampler(indices, batch_size, seed)


def split_train_validation(n_cells, val_fraction, seed):
    """Deterministic held-out split; at least one training cell and, if asked, one validation cell."""
    if not (math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise UsageError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng([seed, 12345])
    order = rng.permutation(n_cells)
    n_val = int(round(n_cells * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), n_cells - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
