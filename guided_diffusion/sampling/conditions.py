"""Condition planning: which label combinations to generate, how many cells of each, their library sizes
and their labels in the output.

A condition is a code row (one code per label key); the code ``condition_sizes[k]`` (one past the last
class) is the null value of key k: that key is unconditioned. In the output an unconditioned key is a
missing value (NaN) of its categorical column, so it can never be mistaken for a real label.
"""
import itertools

import numpy as np
import pandas as pd

from guided_diffusion.core import seed_streams
from guided_diffusion.core.errors import UsageError


def parse_condition(spec, label_keys, vocabularies, condition_sizes):
    """``KEY=VALUE[,KEY=VALUE]`` -> a code row; keys left out get their null (unconditioned) value."""
    row, given = list(condition_sizes), set()
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f"--condition takes KEY=VALUE[,KEY=VALUE], got {spec!r}")
        if key not in label_keys:
            raise UsageError(f"--condition key {key!r} is not a label key of this model; "
                             f"label keys: {', '.join(label_keys)}")
        if key in given:
            raise UsageError(f"--condition {spec}: key {key} is given twice; give each key once")
        given.add(key)
        if value not in vocabularies[key]:
            raise UsageError(f"--condition {key}={value}: unknown value; valid values of {key}: "
                             f"{', '.join(vocabularies[key])}")
        row[label_keys.index(key)] = vocabularies[key].index(value)
    return row


def condition_matches(row, codes, condition_sizes):
    """Whether training label codes ``codes`` fall under condition ``row`` (a null key matches anything)."""
    return all(r == size or r == c for r, c, size in zip(row, codes, condition_sizes))


def training_cell_count(row, condition_counts, condition_sizes):
    """Training cells matching ``row`` (null keys match anything)."""
    return sum(entry[-1] for entry in condition_counts if condition_matches(row, entry[:-1], condition_sizes))


DEFAULT_NUM_SAMPLES = 1000  # cells per condition when --num_samples is not given


def check_condition_flags(specs=(), all_combinations=False, match_counts=False, num_samples=None):
    """Refuse flags that contradict each other (``num_samples`` None: not given)."""
    if specs and all_combinations:
        raise UsageError("--all_combinations True and --condition contradict each other: --condition names the "
                         "conditions to generate, --all_combinations every combination of label values; give one")
    if match_counts and num_samples is not None:
        raise UsageError(f"--match_counts and --num_samples {num_samples} contradict each other: --match_counts "
                         f"generates as many cells per condition as training had; give one")


def plan_conditions(loaded, specs=(), all_combinations=False, match_counts=False, num_samples=None):
    """The conditions to generate and the number of cells of each: [(code_row, n_cells), ...].
    ``num_samples`` None: not given (``DEFAULT_NUM_SAMPLES`` per condition, or the training counts)."""
    check_condition_flags(specs, all_combinations, match_counts, num_samples)
    num_samples = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
    keys, vocabularies = loaded.label_keys, loaded.vocabularies
    sizes = list(loaded.model.condition_sizes)
    counts = loaded.checkpoint.condition_counts
    if specs:
        rows = [parse_condition(spec, keys, vocabularies, sizes) for spec in specs]
        for index, row in enumerate(rows):
            if row in rows[:index]:
                raise UsageError(f"--condition {describe_condition(row, keys, vocabularies)} is given twice; give "
                                 f"each condition once (--num_samples sets the cells per condition)")
    elif all_combinations:
        rows = [list(combo) for combo in itertools.product(*[range(n) for n in sizes])]
    else:
        rows = [entry[:-1] for entry in counts]
    plan = []
    for row in rows:
        if match_counts:
            count = training_cell_count(row, counts, sizes)
            if count == 0:
                raise UsageError(f"--match_counts: condition {describe_condition(row, keys, vocabularies)} "
                                 f"has no training cells; give --num_samples without --match_counts")
        else:
            count = num_samples
        plan.append((row, count))
    return plan


def unseen_conditions(plan, condition_counts, condition_sizes):
    """The planned rows that match no training cell (e.g. from --all_combinations)."""
    return [row for row, _ in plan if training_cell_count(row, condition_counts, condition_sizes) == 0]


def describe_condition(row, label_keys, vocabularies):
    parts = [f"{key}={vocabularies[key][code]}" for key, code in zip(label_keys, row) if code < len(vocabularies[key])]
    return ",".join(parts) or "unconditional"


def latent_file_name(row, condition_sizes, settings):
    index = "_".join(str(code) if code < size else "x" for code, size in zip(row, condition_sizes))
    mode = "non_uniform" if settings.non_uniform else "uniform"
    return f"cell{index}_cache{settings.cache_interval}_{mode}.npy"


def label_columns(cond_rows, label_keys, vocabularies):
    """obs columns: per key a categorical of the class names, NaN (missing) where the key is unconditioned."""
    columns = {}
    for column, key in enumerate(label_keys):
        vocabulary = vocabularies[key]
        codes = np.asarray(cond_rows[:, column])
        present = sorted(set(int(c) for c in codes if c < len(vocabulary)))
        lookup = {code: position for position, code in enumerate(present)}
        category_codes = np.array([lookup.get(int(c), -1) for c in codes], dtype=np.int64)
        columns[key] = pd.Categorical.from_codes(category_codes, categories=[vocabulary[c] for c in present])
    return columns


def draw_library_sizes(row, quantile_entries, condition_sizes, count, seed, condition_index):
    """Total counts for ``count`` generated cells of condition ``row``.

    ``quantile_entries`` is the checkpoint's ``library_size_quantiles``: per training label combination
    [code_1..code_K, n_cells, [quantiles of log total counts]]. Each cell picks a combination matching
    ``row`` (null keys match anything) in proportion to its cells, then a total interpolated from its
    quantiles at a uniform level. A combination never seen in training (--all_combinations) matches on
    its first keys only (e.g. the cell type of an unseen cell type x donor). Reproducible from
    (seed, condition_index).
    """
    row = list(row)
    for relaxed in range(len(row), -1, -1):  # an unseen combination: drop keys from the last until cells match
        wanted = row[:relaxed] + list(condition_sizes[relaxed:])
        matching = [entry for entry in quantile_entries if condition_matches(wanted, entry[:-2], condition_sizes)]
        if matching:
            break
    weights = np.array([entry[-2] for entry in matching], dtype=np.float64)
    quantiles = np.array([entry[-1] for entry in matching], dtype=np.float64)
    rng = seed_streams.numpy_generator(seed, seed_streams.LIBRARY_SIZES, condition_index)
    chosen = rng.choice(len(matching), size=count, p=weights / weights.sum())
    levels = rng.random(count) * (quantiles.shape[1] - 1)
    lower = np.floor(levels).astype(np.int64)
    upper = np.minimum(lower + 1, quantiles.shape[1] - 1)
    fraction = levels - lower
    log_totals = quantiles[chosen, lower] * (1 - fraction) + quantiles[chosen, upper] * fraction
    return np.exp(log_totals).astype(np.float32)
