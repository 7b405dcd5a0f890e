"""Splitting an .h5ad into training and held-out cells, stratified by label, seeded, reusable: what
exp_script/split.py runs (and exp_script/choose_autoencoder.py, for its validation cells)."""
import os

import numpy as np
import pandas as pd

from guided_diffusion.core.atomic import atomic_output
from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import DEFAULT_LABEL_KEY, read_h5ad
from guided_diffusion.sampling.writer import write_h5ad

SIDES = ("train", "heldout")


def stratified_split(labels, heldout_fraction, seed):
    """Boolean mask of held-out cells: per label, round(fraction x count) cells, never all of them."""
    labels = np.asarray(labels, dtype=str)
    rng = np.random.default_rng([seed, 11])
    heldout = np.zeros(len(labels), dtype=bool)
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels == label)
        count = min(int(round(heldout_fraction * len(members))), len(members) - 1)
        heldout[rng.choice(members, count, replace=False)] = True
    return heldout


def _read_saved_split(path, adata):
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read the split file {path}: {error}") from error
    if not {"cell", "side"} <= set(table.columns):
        raise UsageError(f"{path} is not a split file (needs the columns cell and side)")
    sides = dict(zip(table["cell"], table["side"]))
    names = list(map(str, adata.obs_names))
    missing = [name for name in names if name not in sides]
    if missing:
        raise UsageError(f"{len(missing)} cells of the data are not in {path} (first: {missing[0]}); "
                         f"the split was made for another file")
    unknown = sorted(set(sides.values()) - set(SIDES))
    if unknown:
        raise UsageError(f"{path} has sides {', '.join(unknown)}; expected train or heldout")
    return np.array([sides[name] == "heldout" for name in names])


def split_file(data_dir, out, label_key=DEFAULT_LABEL_KEY, heldout_fraction=0.2, seed=0, from_split=None):
    """Write OUT/train.h5ad, OUT/heldout.h5ad and OUT/split.csv; returns the paths."""
    adata = read_h5ad(data_dir)
    if label_key not in adata.obs.columns:
        raise UsageError(f"label key {label_key!r} not in {data_dir}'s obs; available columns: "
                         f"{', '.join(map(str, adata.obs.columns)) or '(none)'}")
    if adata.obs[label_key].isna().any():
        raise UsageError(f"label key {label_key!r} is missing for {int(adata.obs[label_key].isna().sum())} cells")
    if not adata.obs_names.is_unique:
        raise UsageError(f"{data_dir} has duplicate cell names; make them unique (adata.obs_names_make_unique())")
    labels = adata.obs[label_key].astype(str).to_numpy()
    heldout = _read_saved_split(from_split, adata) if from_split else stratified_split(labels, heldout_fraction,
                                                                                       seed)
    if not heldout.any():
        raise UsageError(f"the split holds out no cells (--heldout_fraction {heldout_fraction}, "
                         f"{adata.n_obs} cells); raise the fraction")
    paths = {side: os.path.join(out, f"{side}.h5ad") for side in SIDES}
    paths["split"] = os.path.join(out, "split.csv")
    os.makedirs(out, exist_ok=True)
    for side, rows in (("train", ~heldout), ("heldout", heldout)):
        write_h5ad(paths[side], adata[rows].copy())  # a full disk: one line, no h5py errors
    table = pd.DataFrame({"cell": adata.obs_names.astype(str), "label": labels,
                          "side": np.where(heldout, "heldout", "train")})
    with atomic_output(paths["split"]) as temporary:
        table.to_csv(temporary, index=False)
    return paths, table
