"""Choosing the guidance weights of condition combinations never seen in training, on validation combinations.

A two-key model (cell type x donor, say) is trained without one or more combinations whose real cells the user
keeps as validation. For each candidate ``--unseen_guide_w`` setting and sampling seed, the validation
combinations are generated (the sampler's composed form for unseen conditions) and scored as
``exp_script/unseen_combination.py score`` scores one: a donor classifier fitted on the validation file's real
cells of the type (all donors) calls the generated cells (``called_right``, beside the real cells' own
out-of-fold rate), and the kNN AUC of the generated cells against the real cells of the combination measures
realism (0.5 = indistinguishable). RULE picks the setting; ``guidance_sweep.py --record True`` stores it in
the checkpoint, where the sampler takes it by default for every unseen combination.
"""
import numpy as np
import pandas as pd

from exp_script.evaluation.label_classifier import fit_label_classifier, out_of_fold_labels
from exp_script.evaluation.metrics import knn_auc
from guided_diffusion.core.errors import UsageError
from guided_diffusion.sampling.conditions import parse_condition

# a setting qualifies when its generated cells are called the intended donor at least this share of the rate
# real cells of the combination are (out of fold); the acceptance: 0.8 of the time where real cells
# are called right 0.98 of the time
CALLED_RIGHT_SHARE = 0.8
MIN_VALIDATION_CELLS = 10
# cells of a (type, donor) pair needed for its mean in the donor-shift references
MIN_SHIFT_CELLS = 10
RULE = (f"among the settings whose generated cells are called the intended value of the later key at least "
        f"{CALLED_RIGHT_SHARE:g} x as often as the real cells of the combination are (out of fold), the one with the "
        f"lowest kNN AUC against those real cells; if none qualifies, the one called right most often")


def donor_calls(real_x, real_obs, generated_x, generated_obs, type_key, donor_key, cell_type, donor, seed=0):
    """The held-out combination's figures and the seen combinations', from one donor classifier of the type."""
    of_type = (real_obs[type_key] == cell_type).to_numpy()
    if not of_type.any():
        raise UsageError(f"no real cells of {type_key}={cell_type}")
    type_x, type_donors = real_x[of_type], real_obs[donor_key].to_numpy()[of_type]
    if donor not in set(type_donors):
        raise UsageError(f"no real cells of {type_key}={cell_type},{donor_key}={donor}: nothing to compare with")
    out_of_fold = out_of_fold_labels(type_x, type_donors, seed=seed)
    classifier = fit_label_classifier(type_x, type_donors, seed=seed)
    generated_type = (generated_obs[type_key] == cell_type).to_numpy()
    generated_donors = generated_obs[donor_key].to_numpy()
    called = classifier.predict(generated_x[generated_type]) if generated_type.any() else np.array([])
    features = classifier[:-1]  # the classifier's own feature space: variable genes, standardized, PCA
    real_features = features.transform(type_x)
    generated_features = features.transform(generated_x[generated_type]) if generated_type.any() else None
    rows = []
    for each_donor in sorted(set(type_donors)):
        real_rows = type_donors == each_donor
        generated_rows = generated_donors[generated_type] == each_donor
        rows.append({
            "donor": each_donor, "held_out": each_donor == donor,
            "real_cells": int(real_rows.sum()),
            "real_called_correctly": float(np.mean(out_of_fold[real_rows] == each_donor)),
            "generated_cells": int(generated_rows.sum()),
            "generated_called_correctly": float(np.mean(called[generated_rows] == each_donor))
            if generated_rows.any() else None,
            # a donor-blind generator: this type's cells of the other donors, out of fold
            "donor_blind_called_this_donor": float(np.mean(out_of_fold[~real_rows] == each_donor)),
            # fidelity: kNN real-vs-generated AUC of this combination's cells (0.5 = indistinguishable)
            "knn_auc": knn_auc(real_features[real_rows], generated_features[generated_rows], seed)
            if generated_rows.sum() >= 2 else None,
            # a reference for that figure: the type's real cells of the other donors against this combination's
            # (as many as were generated, else as many as it has): what a generator that draws the right type
            # from another donor's cells would score
            "other_donors_real_knn_auc": other_donors_auc(real_features, real_rows, int(generated_rows.sum()),
                                                           seed),
        })
    return rows, classifier


def _other_donor_rows(real_rows, count, seed):
    """Rows of the type's cells of the other donors standing in for ``count`` generated cells (as many as the
    combination has when fewer than 2 were generated); None when either side has fewer than 2 cells."""
    others = np.flatnonzero(~real_rows)
    count = min(len(others), count if count >= 2 else int(real_rows.sum()))
    if count < 2 or real_rows.sum() < 2:
        return None
    return np.sort(np.random.default_rng([seed, 17]).choice(others, count, replace=False))


def other_donors_auc(real_features, real_rows, count, seed):
    """kNN AUC of the type's real cells of the other donors (:func:`_other_donor_rows`) against the combination's
    (``real_rows`` of ``real_features``): a generator right about the type and blind to the donor; None when
    either side has fewer than 2 cells."""
    chosen = _other_donor_rows(real_rows, count, seed)
    return None if chosen is None else knn_auc(real_features[real_rows], real_features[chosen], seed)


def donor_shift_references(real_x, real_obs, type_key, donor_key, cell_type, donor, classifier, count, seed=0):
    """What real cells moved by a donor effect score, as references for a held-out combination's generated cells.

    The type's real cells of the other donors (the cells :func:`other_donors_auc` draws) are moved, per source
    donor, by a per-gene shift of the log-normalized expression (clipped at 0):

    * ``additive_shift``: the held-out donor's mean difference from the source donor on the *other* types both
      have (at least MIN_SHIFT_CELLS cells each), averaged over those types: the best an additive donor effect
      learned without the combination's cells can give, with real cells' own variation;
    * ``own_mean_shift``: the combination's own mean difference from the source donor's cells of the type, an
      oracle that knows the answer's mean: what a generator right about the mean, and nothing more, reaches.

    Returns {"<reference>_knn_auc", "<reference>_called_correctly"} (kNN AUC against the combination's real
    cells in the donor classifier's feature space, and the share the classifier calls ``donor``), each None where
    no cells could be built, and "additive_shift_types" (the other types the shift was averaged over).
    """
    types, donors = real_obs[type_key].to_numpy(), real_obs[donor_key].to_numpy()
    of_type = types == cell_type
    type_x, type_donors = real_x[of_type], donors[of_type]
    real_rows = type_donors == donor
    chosen = _other_donor_rows(real_rows, count, seed)
    result = {f"{name}_{figure}": None for name in ("additive_shift", "own_mean_shift")
              for figure in ("knn_auc", "called_correctly")}
    result["additive_shift_types"] = []
    if chosen is None:
        return result
    features = classifier[:-1]
    real_features = features.transform(type_x[real_rows])
    sources = type_donors[chosen]
    other_types = sorted(set(types[~of_type]))

    def enough(each_type, each_donor):
        return int(((types == each_type) & (donors == each_donor)).sum()) >= MIN_SHIFT_CELLS

    def mean_of(each_type, each_donor):
        return real_x[(types == each_type) & (donors == each_donor)].mean(axis=0)

    shifts = {"additive_shift": {}, "own_mean_shift": {}}
    used = set()
    own_mean = type_x[real_rows].mean(axis=0)
    for source in sorted(set(sources)):
        shifts["own_mean_shift"][source] = own_mean - type_x[type_donors == source].mean(axis=0)
        common = [t for t in other_types if enough(t, donor) and enough(t, source)]
        if common:
            used.update(common)
            shifts["additive_shift"][source] = np.mean([mean_of(t, donor) - mean_of(t, source) for t in common], axis=0)
    result["additive_shift_types"] = sorted(used)
    for name, by_source in shifts.items():
        rows = np.isin(sources, list(by_source))
        if rows.sum() < 2:
            continue
        moved = np.vstack([np.maximum(type_x[chosen[sources == source]] + by_source[source], 0.0)
                           for source in sorted(by_source)]).astype(np.float32)
        result[f"{name}_knn_auc"] = knn_auc(real_features, features.transform(moved), seed)
        result[f"{name}_called_correctly"] = float(np.mean(classifier.predict(moved) == donor))
    return result


def validation_combinations(loaded, obs, requested=None, min_cells=MIN_VALIDATION_CELLS):
    """[(code row, {key: value}, real cells)] of the validation cells' combinations the model never saw in
    training: every key's value known to the model, the combination absent from its training counts, at least
    ``min_cells`` real cells. ``requested`` (``KEY=VALUE,KEY=VALUE`` strings) restricts them to those named."""
    keys, vocabularies = loaded.label_keys, loaded.vocabularies
    if len(keys) != 2:
        raise UsageError(f"--unseen_weights chooses the weights of a two-key model (cell type x donor); this model "
                         f"has {len(keys)} label key(s): {', '.join(keys)}")
    seen = {tuple(entry[:-1]) for entry in loaded.checkpoint.condition_counts}
    known = obs[keys[0]].isin(vocabularies[keys[0]]) & obs[keys[1]].isin(vocabularies[keys[1]])
    groups = obs[known].groupby(keys, observed=True, sort=True).size()
    found = []
    for (first, second), count in groups.items():
        row = [vocabularies[keys[0]].index(first), vocabularies[keys[1]].index(second)]
        if tuple(row) not in seen and count >= min_cells:
            found.append((row, {keys[0]: first, keys[1]: second}, int(count)))
    if requested:
        sizes = [len(vocabularies[key]) for key in keys]
        rows = [parse_condition(spec, keys, vocabularies, sizes) for spec in requested]
        for spec, row in zip(requested, rows):
            if not any(row == each for each, _, _ in found):
                raise UsageError(f"--unseen_condition {spec}: not a combination of the validation cells that the "
                                 f"model never saw in training (with at least {min_cells} cells)")
        found = [entry for entry in found if entry[0] in rows]
    if not found:
        raise UsageError(f"the validation cells hold no combination of {keys[0]} x {keys[1]} that the model never saw "
                         f"in training (with at least {min_cells} cells); train without one "
                         f"(exp_script/unseen_combination.py exclude) and give its real cells")
    return found


def score_combinations(real_x, real_obs, generated_x, generated_obs, keys, combinations, seed):
    """Per validation combination: generated cells called right, real cells called right (out of fold) and the
    kNN AUC of generated vs real cells of the combination (:func:`donor_calls`)."""
    scores = []
    for _, values, _ in combinations:
        first, second = values[keys[0]], values[keys[1]]
        of_type = real_obs[keys[0]] == first
        if real_obs.loc[of_type, keys[1]].nunique() < 2:
            raise UsageError(f"the validation cells of {keys[0]}={first} come from one {keys[1]} only: no "
                             f"{keys[1]} classifier can be fitted; give real cells of that type from other "
                             f"{keys[1]} values too (e.g. the whole dataset)")
        rows, _ = donor_calls(real_x, real_obs, generated_x, generated_obs, keys[0], keys[1], first, second, seed)
        target = next(row for row in rows if row["donor"] == second)
        scores.append({"combination": f"{keys[0]}={first},{keys[1]}={second}",
                       "called_right": target["generated_called_correctly"],
                       "real_called_right": target["real_called_correctly"], "knn_auc": target["knn_auc"]})
    return scores


def summarize(rows):
    """Mean and sd over seeds and validation combinations per setting, in the order given."""
    table = pd.DataFrame(rows)
    order = list(dict.fromkeys(table["unseen_guide_w"]))
    grouped = table.groupby("unseen_guide_w", sort=False)[["called_right", "real_called_right", "knn_auc"]]
    return grouped.mean().join(grouped.std(ddof=0), rsuffix="_sd").loc[order].reset_index()


def recommend(summary):
    """The row RULE picks."""
    eligible = summary[summary["called_right"] >= CALLED_RIGHT_SHARE * summary["real_called_right"]]
    if len(eligible):
        return eligible.loc[eligible["knn_auc"].idxmin()]
    return summary.loc[summary["called_right"].idxmax()]


def markdown(summary, chosen, combinations):
    lines = ["| --unseen_guide_w | called right | real cells called right | kNN AUC vs real cells (0.5 best) |",
             "| --- | ---: | ---: | ---: |"]
    for _, row in summary.iterrows():
        mark = " **(chosen)**" if row["unseen_guide_w"] == chosen["unseen_guide_w"] else ""
        lines.append(f"| {row['unseen_guide_w']}{mark} | {row['called_right']:.3f} ± {row['called_right_sd']:.3f} | "
                     f"{row['real_called_right']:.3f} | {row['knn_auc']:.3f} ± {row['knn_auc_sd']:.3f} |")
    names = ", ".join(f"{', '.join(f'{k}={v}' for k, v in values.items())} ({count} cells)"
                      for _, values, count in combinations)
    lines += ["", f"Validation combinations (never seen in training): {names}.",
              f"Chosen: --unseen_guide_w {chosen['unseen_guide_w']} ({RULE})."]
    return "\n".join(lines) + "\n"


def choice_record(chosen, combinations, validation, seeds):
    """What the checkpoint records beside the chosen weights."""
    return {"by": "exp_script/guidance_sweep.py --unseen_weights", "rule": RULE, "validation": str(validation),
            "combinations": [", ".join(f"{k}={v}" for k, v in values.items()) for _, values, _ in combinations],
            "seeds": [int(s) for s in seeds], "called_right": float(chosen["called_right"]),
            "real_called_right": float(chosen["real_called_right"]), "knn_auc": float(chosen["knn_auc"])}


def as_weights(setting, label_keys):
    """A resolved --unseen_guide_w value as {key: weight} over the label keys."""
    if isinstance(setting, dict):
        return {key: float(setting[key]) for key in label_keys}
    return {key: float(setting) for key in label_keys}


def check_mean_finite(summary):
    if not np.isfinite(summary[["called_right", "knn_auc"]].to_numpy()).all():
        raise UsageError("a setting produced no scorable cells (fewer than 2 generated cells of a combination); "
                         "raise --max_per_condition")
