"""The comparisons: every selected metric for every compared set against the real reference half, then
the novelty and usefulness checks (with training cells), as one JSON-ready dict."""
from dataclasses import asdict

import numpy as np

from . import de_fidelity as de
from . import metrics as m
from .inputs import json_ready
from .settings import (CELL_METRICS, CLASSIFIER_METRICS, CONDITION_METRICS, DE_METRICS, GENE_METRICS,
                       METRIC_INFO, METRICS, NEGATIVE_CONTROLS, RESULT_FORMAT, SECTION_INFO, SECTION_TITLES,
                       EvaluationSettings, Progress, blind_to, log_to_stderr)
from .features import FeatureSpace, subsample_rows
from .novelty import novelty
from .preparation import CellSet, control_source, markers, negative_controls, positive_control, prepare, sections_of
from .usefulness import UsefulnessSettings, usefulness


def compare(prepared, section, progress):
    """All selected metrics, overall and per evaluated label, for one section (a compared set against
    the reference half)."""
    data, settings, wanted = prepared.data, prepared.settings, set(prepared.settings.metrics)
    reference, compared = prepared.sets["reference"], prepared.sets[section]
    overall = {}
    per_label = {label: {"n_reference": int((reference.labels == label).sum()),
                         "n_compared": int((compared.labels == label).sum())} for label in prepared.labels}
    title = SECTION_TITLES[section]
    result = {"n_reference": int(len(reference.labels)), "n_compared": int(len(compared.labels))}

    if wanted & set(GENE_METRICS):
        progress.stage(f"{title}: gene-level statistics")
        overall.update(_gene_metrics(reference.x, compared.x, wanted))
        for label in prepared.labels:
            per_label[label].update(_gene_metrics(reference.x[reference.labels == label],
                                                  compared.x[compared.labels == label], wanted))
    if wanted & set(CELL_METRICS):
        progress.stage(f"{title}: PCA of the pooled cells, MMD, iLISI, classifiers")
        result["feature_space"] = _cell_metrics(prepared, reference, compared, wanted, overall, per_label)
    if "celltypist_accuracy" in wanted:
        progress.stage(f"{title}: CellTypist")
        columns = prepared.celltypist_columns
        predicted = m.predict_celltypist(prepared.celltypist_model, compared.x[:, columns],
                                         [data.genes[j] for j in columns])
        known = np.isin(compared.labels, prepared.celltypist_model.cell_types)
        overall["celltypist_accuracy"] = m.label_accuracy(predicted[known], compared.labels[known])
        for label in prepared.labels:
            rows = compared.labels == label
            per_label[label]["celltypist_accuracy"] = m.label_accuracy(predicted[rows], compared.labels[rows])
    if "marker_jaccard" in wanted and prepared.reference_markers is not None:
        progress.stage(f"{title}: marker genes")
        result["markers"] = markers(prepared, compared.x, compared.labels)
        scores = {label: m.jaccard(prepared.reference_markers[label], found)
                  for label, found in result["markers"].items()}
        overall["marker_jaccard"] = float(np.mean(list(scores.values()))) if scores else float("nan")
        for label, score in scores.items():
            per_label[label]["marker_jaccard"] = score
    if wanted & set(DE_METRICS + CONDITION_METRICS):
        progress.stage(f"{title}: differential-expression fidelity")
        result["condition_effects"] = _de_metrics(prepared, section, wanted, overall, per_label)
    result["overall"] = {name: overall[name] for name in METRICS if name in overall}
    result["per_label"] = per_label
    return result


def _gene_metrics(reference_x, compared_x, wanted):
    values = {}
    if {"scc", "pcc"} & wanted:
        values.update({k: v for k, v in m.gene_mean_correlations(reference_x, compared_x).items() if k in wanted})
    if "wasserstein" in wanted:
        values["wasserstein"] = m.mean_wasserstein(reference_x, compared_x)
    if "wasserstein_means" in wanted:
        values["wasserstein_means"] = m.wasserstein_of_means(reference_x, compared_x)
    return values


def _cell_metrics(prepared, reference, compared, wanted, overall, per_label):
    """MMD, iLISI and the classifiers on a PCA of the two sets pooled; returns the feature-space sizes."""
    settings = prepared.settings
    features = FeatureSpace(np.vstack([reference.x, compared.x]), prepared.data.genes, settings.n_hvg,
                            settings.n_pcs, settings.seed)
    reference_embedding, compared_embedding = features.embed(reference.x), features.embed(compared.x)
    if "mmd" in wanted:
        rng = np.random.default_rng([settings.seed, 5])
        gammas = m.rbf_gammas(reference_embedding, rng)
        first = reference_embedding[subsample_rows(len(reference_embedding), settings.mmd_max_cells, rng)]
        second = compared_embedding[subsample_rows(len(compared_embedding), settings.mmd_max_cells, rng)]
        overall["mmd"] = m.mmd_rbf(first, second, gammas)
        for label in prepared.labels:
            per_label[label]["mmd"] = m.mmd_rbf(reference_embedding[reference.labels == label],
                                                compared_embedding[compared.labels == label], gammas)
    if "ilisi" in wanted:
        embedding = np.vstack([reference_embedding, compared_embedding])
        sources = np.r_[np.zeros(len(reference.labels), int), np.ones(len(compared.labels), int)]
        lisi, overall["ilisi"] = m.lisi_per_cell(embedding, sources, settings.lisi_neighbors)
        combined_labels = np.concatenate([reference.labels, compared.labels])
        for label in prepared.labels:
            per_label[label]["ilisi"] = m.scaled_ilisi(lisi[combined_labels == label])
    if wanted & set(CLASSIFIER_METRICS):
        _classifier_metrics(prepared, reference_embedding, reference.labels, compared_embedding, compared.labels,
                            wanted, overall, per_label)
    return {"variable_genes": int(len(features.genes)), "pca_components": int(features.pca.n_components_)}


def _classifier_metrics(prepared, reference_embedding, reference_labels, compared_embedding, compared_labels,
                        wanted, overall, per_label):
    """Real-vs-compared classifiers on a balanced sample (the larger side is subsampled), scored on
    out-of-fold predictions; per-label figures score those predictions within one label."""
    settings = prepared.settings
    rng = np.random.default_rng([settings.seed, 6])
    size = min(len(reference_labels), len(compared_labels))
    reference_rows = np.sort(rng.choice(len(reference_labels), size, replace=False))
    compared_rows = np.sort(rng.choice(len(compared_labels), size, replace=False))
    features = np.vstack([reference_embedding[reference_rows], compared_embedding[compared_rows]])
    is_compared = np.r_[np.zeros(size, bool), np.ones(size, bool)]
    labels = np.concatenate([reference_labels[reference_rows], compared_labels[compared_rows]])

    classifiers = {}
    if {"knn_auc", "knn_accuracy"} & wanted:
        classifiers["knn"] = m.knn_classifier(settings.knn_neighbors)
    if "rf_auc" in wanted:
        classifiers["rf"] = m.random_forest_classifier(settings.rf_trees, seed=settings.seed)
    for name, classifier in classifiers.items():
        probabilities = m.out_of_fold_probabilities(features, is_compared, classifier, settings.folds, settings.seed,
                                                    groups=labels)
        groups = [(overall, np.ones(len(labels), bool))]
        groups += [(per_label[label], labels == label) for label in prepared.labels]
        for target, rows in groups:
            scores = m.two_sample_scores(probabilities[rows], is_compared[rows])
            if f"{name}_auc" in wanted:
                target[f"{name}_auc"] = scores["auc"]
            if f"{name}_accuracy" in wanted:
                target[f"{name}_accuracy"] = scores["accuracy"]


def _de_metrics(prepared, section, wanted, overall, per_label):
    """One-vs-rest DE fidelity per label and, with condition keys, condition effects within labels."""
    settings, genes = prepared.settings, prepared.data.genes
    reference, compared = prepared.sets["reference"], prepared.sets[section]
    conditions = {}
    if wanted & set(DE_METRICS):
        figures, prepared.fold_changes[section] = de.one_vs_rest(reference.x, reference.labels, compared.x,
                                                                 compared.labels, genes, prepared.labels,
                                                                 settings.de_method)
        for label, values in figures.items():
            per_label[label].update({f"de_{name}": value for name, value in values.items()})
        for name in DE_METRICS:
            if name in wanted:
                overall[name] = de.median_of(figures, name[len("de_"):])
    keys = [key for key in reference.conditions if key in compared.conditions]
    if wanted & set(CONDITION_METRICS) and keys:
        for key in keys:
            conditions[key] = de.within_label_conditions(
                reference.x, reference.labels, reference.conditions[key], compared.x, compared.labels,
                compared.conditions[key], genes, prepared.labels, settings.condition_min_cells, settings.de_method)
        pooled = {f"{key} | {pair}": values for key, pairs in conditions.items() for pair, values in pairs.items()}
        for name in CONDITION_METRICS:
            if name in wanted:
                overall[name] = de.median_of(pooled, name[len("de_condition_"):])
    return conditions


def blind_spots(results, sections):
    """Per metric and negative control: does the control score as well as the positive control?"""
    positive = results["positive_control"]
    found = {}
    for name in results["metric_info"]:
        positive_value = results[positive]["overall"].get(name)
        found[name] = {control: blind_to(name, results[control]["overall"].get(name), positive_value)
                       for control in NEGATIVE_CONTROLS if control in sections}
    return found


def run_comparisons(data, settings=None, log=log_to_stderr, progress=None):
    """Every comparison (generated, positive and negative controls) as one JSON-ready dict, plus the
    prepared state for plots; with training cells also the novelty and usefulness checks."""
    settings = settings or EvaluationSettings()
    progress = progress or Progress(log)
    prepared = prepare(data, settings, progress)
    sections = sections_of(prepared)
    results = {
        "format": RESULT_FORMAT,
        "label_key": data.label_key,
        "inputs": data.inputs,
        "warnings": list(data.warnings) + list(prepared.notes),
        "sections": sections,
        "section_info": {name: {"title": SECTION_INFO[name][0], "kind": SECTION_INFO[name][1]} for name in sections},
        "positive_control": positive_control(prepared),
        "collapsed_kind": prepared.collapsed_kind,
        "split": {
            "reference_cells": int(len(prepared.reference)),
            "control_cells": int(len(prepared.control)),
            "generated_cells_used": int(len(prepared.generated)),
            "generated_cells_total": int(data.generated.shape[0]),
            "cells_per_section": {name: int(len(prepared.sets[name].labels)) for name in sections},
        },
        "settings": json_ready(asdict(settings)),
        "metric_info": {name: {"better": better, "description": text}
                        for name, (better, text) in METRIC_INFO.items() if name in settings.metrics
                        and (name not in CONDITION_METRICS or data.inputs.get("condition_keys"))},
        "labels": {"evaluated": prepared.labels, "min_cells": settings.min_cells,
                   "skipped": prepared.skipped_labels, "unknown_generated": prepared.unknown_generated_labels},
    }
    for section in sections:
        results[section] = compare(prepared, section, progress)
    results["blind_spots"] = blind_spots(results, sections)
    if prepared.reference_markers is not None:
        results["reference_markers"] = prepared.reference_markers
    if data.train is not None:
        progress.stage("novelty: nearest training cell of every compared cell")
        results["novelty"] = novelty_check(prepared)
        progress.stage("usefulness: classifiers trained on generated cells, rare-type augmentation")
        results["usefulness"] = usefulness_check(data, settings)
    return results, prepared


def novelty_check(prepared):
    """Nearest-training-cell distances in a PCA fitted on the training cells: every compared set (held-out
    halves, generated cells, controls) is then out-of-sample alike (a PCA fitted with the held-out cells
    gives them extra variance along its trailing components, and so larger distances)."""
    data, settings = prepared.data, prepared.settings
    space = FeatureSpace(data.train, data.genes, settings.n_hvg, settings.n_pcs, settings.seed)
    compared = {name: space.embed(prepared.sets[name].x)
                for name in ("generated", "real_vs_real", "memorizer", "collapsed") if name in prepared.sets}
    return novelty(space.embed(data.train), space.embed(prepared.sets["reference"].x), compared)


def usefulness_check(data, settings):
    """Train-on-synthetic and rare-type augmentation with all generated cells (and full-size controls)."""
    generated = CellSet(data.generated, data.generated_labels)
    sources = {"generated": (generated.x, generated.labels)}
    if settings.controls:
        train = CellSet(data.train, data.train_labels)
        source, from_train = control_source(data, train)
        memorizer, collapsed, _ = negative_controls(data, CellSet(source.x, source.labels), from_train, generated,
                                                    settings.seed)
        sources.update(memorizer=(memorizer.x, memorizer.labels), collapsed=(collapsed.x, collapsed.labels))
    options = UsefulnessSettings(seed=settings.seed, n_hvg=settings.n_hvg, n_pcs=settings.n_pcs,
                                 rare_max_cells=settings.rare_max_cells, seeds=settings.augmentation_seeds)
    return usefulness(data.train, data.train_labels, data.real, data.real_labels, sources, data.genes, options,
                      FeatureSpace)
