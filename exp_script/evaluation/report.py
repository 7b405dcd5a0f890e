"""The report (report.md) and the tables notebooks show: every metric beside the positive control and
both negative controls, the DE-fidelity, novelty and usefulness checks, warnings and the method."""
import numpy as np
import pandas as pd

from .de_fidelity import PRECISION_GENES, TOP_GENES
from .settings import CLASSIFIER_METRICS, METRIC_INFO, METRICS, NEGATIVE_CONTROLS, SECTION_TITLES
from .novelty import PASS_FRACTION, PERCENTILE

PLOT_CAPTIONS = {
    "umap": "UMAP of real and generated cells, by source and by label",
    "mean_scatter": "Per-gene mean expression: real reference half vs generated, and vs the other real half",
    "per_label": "Main metrics per label, generated beside the controls",
    "de_scatter": "One-vs-rest log2 fold changes, real reference vs compared, for the largest labels",
    "de_per_label": "Per-label correlation of one-vs-rest log2 fold changes, every section",
}


def _number(value):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"


def _inputs(results):
    inputs = results["inputs"]
    real, generated = inputs["real"], inputs["generated"]
    kind = {True: "log-normalized", False: "raw counts"}
    lines = [
        f"- Real (held-out): `{real['path']}` — {real['cells_used']} cells (layer {real['layer']}, "
        f"{kind[real['input_is_log']]}); filters: {', '.join(real['filters']) or 'none'}",
        f"- Generated: `{generated['path']}` — {generated['cells']} cells (layer {generated['layer']}, "
        f"{kind[generated['input_is_log']]})",
    ]
    if "train" in inputs:
        lines.append(f"- Training cells: `{inputs['train']['path']}` — {inputs['train']['cells_used']} cells")
    lines += [f"- Label key: `{results['label_key']}`; condition keys: "
              f"{', '.join(inputs.get('condition_keys', [])) or 'none'}; shared genes: {inputs['shared_genes']} "
              f"({inputs['genes_only_in_real']} only in real, {inputs['genes_only_in_generated']} only in generated)",
              f"- Seed: {results['settings']['seed']}"]
    if results.get("warnings"):
        lines += ["", "**Warnings**", ""] + [f"- {warning}" for warning in results["warnings"]]
    return lines


def _design(results):
    split = results["split"]
    sizes = split["cells_per_section"]
    described = "; ".join(f"**{SECTION_TITLES[name]}** {sizes[name]} cells" for name in results["sections"])
    source = "training cells" if "train" in results["inputs"] else "the other real half (no --train given)"
    return ["", f"Every section compares one set of cells with the same reference: a random half of the real "
                f"cells, stratified by label ({split['reference_cells']} cells). Sections: {described}. The "
                f"generated cells are subsampled by label to the size of the other real half (of "
                f"{split['generated_cells_total']}). The **memorizer** resamples {source} with replacement, as many "
                f"per label as the generated set; the **collapsed** generator draws cells around each label's mean "
                f"profile ({results.get('collapsed_kind') or 'log'} space, small noise). A metric marked *blind* "
                f"scores a negative control as well as the positive control "
                f"({SECTION_TITLES[results['positive_control']]}): it cannot detect that failure.", ""]


def _metrics(results):
    sections = results["sections"]
    lines = ["## Metrics", "", "| metric | " + " | ".join(SECTION_TITLES[s] for s in sections)
             + " | better | blind to | meaning |", "|---" * (len(sections) + 4) + "|"]
    for name, info in results["metric_info"].items():
        blind = [control for control, flag in results.get("blind_spots", {}).get(name, {}).items() if flag]
        values = " | ".join(_number(results[s]["overall"].get(name)) for s in sections)
        lines.append(f"| {name} | {values} | {info['better']} | {', '.join(blind) or '–'} | {info['description']} |")
    flagged = [name for name, flags in results.get("blind_spots", {}).items() if flags.get("collapsed")]
    if flagged:
        lines += ["", f"**Scores the collapsed generator as well as real cells:** {', '.join(flagged)}. These "
                      f"metrics cannot tell a generator that learned only the label means from real cells."]
    if set(CLASSIFIER_METRICS) & set(results["metric_info"]):
        lines += ["", "Classifier AUC: 0.5 means real and compared cells cannot be told apart. Well above the "
                      "control, the generated cells are distinguishable; well below 0.5, they sit closer to the "
                      "reference cells than real cells sit to each other, as near-copies of training cells would."]
    return lines
def metrics_table(results):
    """Overall figures: one row per metric, generated beside the positive and negative controls."""
    rows = []
    sections = results.get("sections", ["generated", "real_vs_real"])
    for name in METRICS:
        if name not in results["generated"]["overall"]:
            continue
        row = {"metric": name}
        row.update({section: results[section]["overall"].get(name) for section in sections})
        row["better"] = METRIC_INFO[name][0]
        rows.append(row)
    return pd.DataFrame(rows).set_index("metric") if rows else pd.DataFrame()


def per_label_table(results, section="generated"):
    """Per-label figures of one section: one row per evaluated label."""
    table = pd.DataFrame.from_dict(results[section]["per_label"], orient="index")
    table.index.name = results["label_key"]
    return table


def marker_summary(results, section="generated", shown=10):
    """Per evaluated label: marker overlap with the reference half and the genes on each side."""
    rows = {}
    for label, reference in results.get("reference_markers", {}).items():
        compared = results[section]["markers"][label]
        shared = [gene for gene in reference if gene in set(compared)]
        rows[label] = {
            "marker_jaccard": results[section]["per_label"][label].get("marker_jaccard"),
            "shared": len(shared),
            "top_shared": ", ".join(shared[:shown]),
            "only_reference": ", ".join([gene for gene in reference if gene not in set(compared)][:shown]),
            "only_compared": ", ".join([gene for gene in compared if gene not in set(reference)][:shown]),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = results["label_key"]
    return table


def marker_table(results, label, section="generated"):
    """Top markers of one label in the reference half and in the compared set, side by side."""
    reference = results["reference_markers"][label]
    compared = results[section]["markers"][label]
    shared = set(reference) & set(compared)
    return pd.DataFrame({"reference": reference, "compared": compared,
                         "reference_shared": [gene in shared for gene in reference],
                         "compared_shared": [gene in shared for gene in compared]})



def _per_label(results):
    names, labels = list(results["metric_info"]), results["labels"]
    positive = results["positive_control"]
    lines = ["", "## Per label", "",
             f"Generated value, with the positive control ({SECTION_TITLES[positive]}) in parentheses. Labels with "
             f"fewer than {labels['min_cells']} cells in the reference half, the control half or the generated set "
             f"are skipped (no figure is reported below that minimum).", ""]
    if labels["evaluated"]:
        lines.append("| label | cells (ref/gen) | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 2) + "|")
        for label in labels["evaluated"]:
            generated, control = results["generated"]["per_label"][label], results[positive]["per_label"][label]
            cells = [f"{_number(generated.get(name))} ({_number(control.get(name))})" for name in names]
            lines.append(f"| {label} | {generated['n_reference']}/{generated['n_compared']} | "
                         + " | ".join(cells) + " |")
    else:
        lines.append("No label has enough cells on every side.")
    if labels["skipped"]:
        lines += ["", "Skipped labels (cells in reference / control / generated): "
                  + "; ".join(f"{label} {c['reference']}/{c['control']}/{c['generated']}"
                              for label, c in labels["skipped"].items())]
    if labels["unknown_generated"]:
        lines += ["", "Generated labels absent from the real data: "
                  + ", ".join(f"{label} ({count})" for label, count in labels["unknown_generated"].items())]
    return lines


def _conditions(results):
    keys = results["inputs"].get("condition_keys") or []
    if not keys or "de_condition_lfc_pearson" not in results["metric_info"]:
        return []
    sections = results["sections"]
    lines = ["", "## Condition effects within a label", "",
             f"Log2 fold changes of one condition value against another within one label (pairs with at least "
             f"{results['settings']['condition_min_cells']} cells per side in the reference half and in the "
             f"compared set), Pearson correlation real vs compared.", "",
             "| key | pair | " + " | ".join(SECTION_TITLES[s] for s in sections) + " |",
             "|---" * (len(sections) + 2) + "|"]
    for key in keys:
        for pair, figures in results["generated"].get("condition_effects", {}).get(key, {}).items():
            values = [_number(results[s].get("condition_effects", {}).get(key, {}).get(pair, {}).get("lfc_pearson"))
                      for s in sections]
            lines.append(f"| {key} | {pair} | " + " | ".join(values) + " |")
    return lines


def _novelty(results):
    if "novelty" not in results:
        return ["", "## Novelty", "", "Not computed: give the training cells (--train) to measure memorization."]
    novelty = results["novelty"]
    lines = ["", "## Novelty (memorization)", "",
             f"Distance to the nearest training cell in a PCA fitted on the training cells. Held-out "
             f"reference cells: median {_number(novelty['heldout_median_distance'])}, {PERCENTILE:g}th percentile "
             f"{_number(novelty['threshold_distance'])}. Pass: at most {PASS_FRACTION:.0%} of the compared cells "
             f"closer than that percentile (held-out cells show {PERCENTILE:g}%).", "",
             "| section | median distance | ratio to held-out | fraction closer | passes |", "|---|---|---|---|---|"]
    for name, figures in novelty["sections"].items():
        lines.append(f"| {SECTION_TITLES[name]} | {_number(figures['median_distance'])} | "
                     f"{_number(figures['distance_ratio'])} | {_number(figures['fraction_closer'])} | "
                     f"{_number(figures['passes'])} |")
    return lines


def _usefulness(results):
    return usefulness_lines(results["usefulness"]) if "usefulness" in results else []


def usefulness_lines(useful):
    """The usefulness section: train-on-synthetic table and the rare-type augmentation table."""
    lines = ["", "## Usefulness", "", f"Logistic regression on {useful['features']['pca_components']} principal "
             f"components of the training cells' {useful['features']['variable_genes']} most variable genes, scored "
             f"on all {useful['heldout_cells']} held-out real cells.", "",
             "Train on one source, test on held-out real cells:", "", "| trained on | cells | accuracy | macro-F1 |",
             "|---|---|---|---|"]
    for name, figures in useful["train_on_synthetic"].items():
        lines.append(f"| {name} | {figures['cells']} | {_number(figures['accuracy'])} | "
                     f"{_number(figures['macro_f1'])} |")
    augmentation = useful["augmentation"]
    rare = augmentation["rare_labels"]
    lines += ["", f"Rare-type augmentation: labels with fewer than {augmentation['rare_max_cells']} training cells "
                  f"({', '.join(f'{k} {v}' for k, v in rare.items()) or 'none'}) get their generated cells added to "
                  f"the real training set; mean ± sd over {augmentation['seeds']} bootstrap seeds.", ""]
    if not augmentation["variants"]:
        return lines
    header = ["variant", "macro-F1"] + [f"{label} recall" for label in rare] + [f"{label} F1" for label in rare]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for variant, summary in augmentation["variants"].items():
        def cell(item):
            return f"{item['mean']:.3f} ± {item['sd']:.3f}" if item else "–"
        row = [variant, cell(summary["macro_f1"])]
        row += [cell(summary["per_label"].get(label, {}).get("recall")) for label in rare]
        row += [cell(summary["per_label"].get(label, {}).get("f1")) for label in rare]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _method(results):
    settings, inputs = results["settings"], results["inputs"]
    return ["## Method", "",
            f"- Gene-level metrics (scc, pcc, wasserstein) use all {inputs['shared_genes']} shared genes.",
            f"- Cell-level metrics (mmd, ilisi, classifiers, UMAP) use the first {settings['n_pcs']} principal "
            f"components of the {settings['n_hvg']} most variable genes (z-scored, clipped at 10) of the two compared "
            f"sets pooled, so that neither side is in-sample for the PCA alone.",
            f"- Classifiers: {settings['folds']}-fold out-of-fold predictions on a balanced sample; "
            f"{settings['knn_neighbors']}-NN and a {settings['rf_trees']}-tree random forest. Accuracy is balanced "
            f"accuracy. Per-label figures score the same predictions within one label.",
            f"- iLISI: scib-metrics on a {settings['lisi_neighbors']}-NN graph, scaled to [0, 1]; per label, the "
            f"median per-cell LISI of that label's cells.",
            f"- CellTypist (SGD logistic regression) is trained on the reference half's {settings['n_hvg']} most "
            f"variable genes.",
            f"- Markers: top {settings['marker_top_n']} Wilcoxon genes per label among the "
            f"{settings['marker_genes'] or 'all'} most variable genes, evaluated labels only.",
            f"- DE fidelity: scanpy rank_genes_groups ({settings['de_method']}) on log-normalized values, one label "
            f"against the rest, on each side separately; log2 fold changes (pseudocount 1 on the normalized scale, "
            f"as Seurat's avg_log2FC) over the union of both sides' top {TOP_GENES} genes by |score|; precision "
            f"of the compared top {PRECISION_GENES} up-regulated genes.",
            f"- MMD: RBF kernels with widths 0.25–4 × the reference's median squared distance; at most "
            f"{settings['mmd_max_cells']} cells per side.", ""]


def render_report(results):
    lines = ["# cfDiffusion evaluation", ""] + _inputs(results) + _design(results) + _metrics(results)
    lines += _per_label(results) + _conditions(results) + _novelty(results) + _usefulness(results)
    if results.get("plots"):
        lines += ["", "## Plots", ""]
        for key, file_name in results["plots"].items():
            lines += [f"![{PLOT_CAPTIONS[key]}]({file_name})", "", f"*{PLOT_CAPTIONS[key]}*", ""]
    lines += [""] + _method(results)
    timings = results.get("timings_seconds", {})
    if "total" in timings:
        lines += [f"Runtime: {timings['total']:.1f} s.", ""]
    return "\n".join(lines)
