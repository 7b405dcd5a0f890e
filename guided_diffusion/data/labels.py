"""Labels, filters and genes: which obs columns are conditions, what their values may be, and
whether two gene lists agree.

Label values become the words of ``--condition KEY=V1,KEY2=V2`` and ``--filter KEY=V1,V2``, so a
value that holds ``,`` or ``=``, has leading/trailing spaces or is empty could never be asked for:
such values are refused at load. :func:`format_values` lists values unambiguously (repr-quoted) for
any message that offers a choice.
"""
import numpy as np
import pandas as pd

from guided_diffusion.core.errors import UsageError

DEFAULT_LABEL_KEY = "cell_type1"
# names the tools' output .h5ad (cell_sample.py, exp_script/reconstruct.py) uses in obs next to the label
# columns: a label key of the same name would be overwritten, or (the index name) make the write fail
RESERVED_OBS_COLUMNS = {"library_size": "the total counts drawn for each generated cell",
                        "target_library_size": "the library size each generated cell was drawn for",
                        "cell": "the name of the generated cells' index"}
CONDITION_SEPARATORS = (",", "=")
LISTED_VALUES = 20


def format_values(values, limit=LISTED_VALUES):
    """``'a', 'b, c', ' d'``: each value repr-quoted, so commas and spaces inside one are visible."""
    values = [str(value) for value in values]
    shown = ", ".join(repr(value) for value in values[:limit])
    return shown if len(values) <= limit else f"{shown}, … ({len(values)} values)"


def resolve_label_keys(label_keys, columns, require_labels):
    """The label keys to load: as given, or the default ``cell_type1`` when present."""
    if label_keys is None:
        if DEFAULT_LABEL_KEY in columns:
            label_keys = [DEFAULT_LABEL_KEY]
        elif require_labels:
            raise UsageError(f"no --label_key given and obs has no {DEFAULT_LABEL_KEY!r} column; "
                             f"choose one of: {', '.join(columns) or '(no obs columns)'}")
        else:
            label_keys = []
    for key in label_keys:
        if key not in columns:
            raise UsageError(f"label key {key!r} not in obs; available columns: "
                             f"{', '.join(columns) or '(none)'}")
        if key in RESERVED_OBS_COLUMNS:
            raise UsageError(f"label key {key!r} is a name the tools use in their output obs "
                             f"({RESERVED_OBS_COLUMNS[key]}); copy the labels to a column of another name and use that")
    if len(set(label_keys)) != len(label_keys):
        raise UsageError(f"--label_key given twice: {label_keys}")
    return list(label_keys)


def parse_filters(filters, obs):
    """Boolean mask of the cells kept by ``--filter KEY=V1[,V2]`` (all given filters must hold)."""
    keep = np.ones(len(obs), dtype=bool)
    for item in filters or []:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--filter takes KEY=VALUE[,VALUE], got {item!r}")
        if key not in obs.columns:
            raise UsageError(f"--filter key {key!r} is not an obs column; available: {', '.join(obs.columns)}")
        column = obs[key].astype(str)
        wanted = values.split(",")
        present = set(column.unique())
        absent = [value for value in wanted if value not in present]
        if absent:
            raise UsageError(f"--filter {item}: {format_values(absent)} matches no cell; "
                             f"values of {key}: {format_values(sorted(present))}")
        keep &= column.isin(wanted).to_numpy()
    return keep


def _check_label_column(key, values):
    """Refuse missing, empty, continuous or unrequestable label values, naming the column and count."""
    missing = values.isna().to_numpy()
    if missing.any():
        raise UsageError(f"label key {key!r} is missing for {int(missing.sum())} cells; drop them or fill the column")
    if pd.api.types.is_float_dtype(values.dtype) and not np.all(values.to_numpy() == np.round(values.to_numpy())):
        example = values[values != np.round(values)].iloc[0]
        raise UsageError(f"label key {key!r} holds non-integer numbers (e.g. {example:g}), not categories; "
                         f"use a column of cell categories (or bin the numbers first)")
    strings = values.astype(str)
    empty = (strings.str.strip() == "").to_numpy()
    if empty.any():
        raise UsageError(f"label key {key!r} is empty (or only spaces) for {int(empty.sum())} cells; "
                         f"drop them or fill the column")
    bad = [value for value in sorted(set(strings))
           if value != value.strip() or any(sep in value for sep in CONDITION_SEPARATORS)]
    if bad:
        raise UsageError(f"label key {key!r} has {len(bad)} value(s) with ',' or '=' or leading/trailing spaces, "
                         f"which --condition KEY=VALUE cannot name: {format_values(bad, 5)}; rename them "
                         f"(e.g. replace ',' with ';' and strip spaces)")
    return strings.to_numpy()


def encode_labels(obs, label_keys):
    """Sorted vocabularies and integer codes (cells x keys) of the label columns."""
    vocabularies, codes = {}, np.zeros((len(obs), len(label_keys)), dtype=np.int64)
    for column, key in enumerate(label_keys):
        strings = _check_label_column(key, obs[key])
        vocabulary = sorted(set(strings))
        vocabularies[key] = vocabulary
        lookup = {name: code for code, name in enumerate(vocabulary)}
        codes[:, column] = [lookup[name] for name in strings]
    return vocabularies, codes


def check_shape_and_genes(path, shape, genes):
    """At least one cell and gene; gene names unique."""
    if shape[0] == 0:
        raise UsageError(f"{path} has zero cells")
    if shape[1] == 0:
        raise UsageError(f"{path} has zero genes")
    counts = pd.Index(genes).value_counts()
    duplicated = counts[counts > 1]
    if len(duplicated):
        raise UsageError(f"{path} has duplicate gene names ({len(duplicated)} names, e.g. "
                         f"{format_values(duplicated.index[:3])}); make them unique (adata.var_names_make_unique())")


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
    parts.append("use data and checkpoints with the same genes (subset with adata[:, genes] or retrain)")
    raise UsageError("; ".join(parts))
