"""What the stored expression values must be: finite, non-negative, and of the declared kind.

The matrix is checked one block of rows at a time (:class:`ValueScan`), in memory and streamed
alike, and every refusal names what was found: the offending value and the cell and gene holding it,
or (for raw counts declared log-normalized) the evidence that the values are counts.
"""
import numpy as np

from guided_diffusion.core.errors import UsageError

# log-normalized values are (practically) never all whole numbers; whole numbers whose cells sum to
# this much or more (median over cells) are raw counts
COUNT_LIKE_MIN_MEDIAN_TOTAL = 100.0
ALLOW_COUNT_LIKE_FLAG = "--allow_count_like_log True"


def _position(block, index):
    """(row, column) of the ``index``-th stored value of a CSR block."""
    row = int(np.searchsorted(block.indptr, index, side="right")) - 1
    return row, int(block.indices[index])


class ValueScan:
    """Checks blocks of stored values and collects per-cell totals and the evidence for the input kind.

    ``where(cell, gene)`` names a position for a message (e.g. ``cell 'c1', gene 'CD3E'``).
    """

    def __init__(self, n_cells, input_is_log, where):
        self.input_is_log = bool(input_is_log)
        self.where = where
        self.totals = np.zeros(n_cells, dtype=np.float64)
        self.all_whole = True
        self.n_values = 0
        self.largest = 0.0

    def _refuse(self, block, start, index, message):
        row, gene = _position(block, index)
        raise UsageError(message.format(value=f"{block.data[index]:g}", where=self.where(start + row, gene)))

    def add(self, start, block):
        """Check the CSR ``block`` holding cells ``start, start + 1, …`` and add up its cell totals."""
        values = block.data
        self.totals[start:start + block.shape[0]] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        if values.size == 0:
            return
        finite = np.isfinite(values)
        if not finite.all():
            self._refuse(block, start, int(np.argmin(finite)),
                         "the expression matrix contains NaN or infinite values; clean the file first "
                         "(first found: {value} for {where})")
        if values.min() < 0:
            self._refuse(block, start, int(np.argmin(values)),
                         "the expression matrix contains negative values (smallest {value}, for {where}); the loader "
                         "expects raw counts or log-normalized values (scaled/centered data cannot be used)")
        whole = values == np.round(values)
        if not self.input_is_log and not whole.all():
            self._refuse(block, start, int(np.argmin(whole)),
                         "the expression matrix has non-integer values but raw counts are expected; if it is "
                         "already log-normalized, pass --input_is_log True (found {value} for {where})")
        self.all_whole = self.all_whole and bool(whole.all())
        self.n_values += values.size
        self.largest = max(self.largest, float(values.max()))

    def finish(self, allow_count_like_log=False):
        """After the last block: refuse raw counts declared log-normalized (unless allowed)."""
        if not self.input_is_log or allow_count_like_log or not self.all_whole or self.n_values == 0:
            return
        median_total = float(np.median(self.totals))
        if median_total < COUNT_LIKE_MIN_MEDIAN_TOTAL:
            return
        raise UsageError(f"--input_is_log True, but the values look like raw counts: all {self.n_values:,} stored "
                         f"values are whole numbers (largest {self.largest:g}) and the median cell total is "
                         f"{median_total:,.0f}; drop --input_is_log (the loader log-normalizes counts itself), "
                         f"or pass {ALLOW_COUNT_LIKE_FLAG} if they really are log-normalized")

