"""The gap analysis' Markdown report, from its JSON-ready results dict."""
import math


def _f(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _expression(results):
    rows = []
    for name, title in results["expression_sets"].items():
        if name not in results["expression"]:
            continue  # e.g. no unit-sphere projection for a variational autoencoder
        overall = results["expression"][name]["overall"]
        rows.append([title, _f(overall["n_compared"]), _f(overall.get("knn_auc")), _f(overall.get("rf_auc"))])
    return ["## (a) Expression space: each set vs the held-out real cells", "",
            *_table(["compared set", "cells per side", "kNN AUC", "RF AUC"], rows), ""]


def _latent(results):
    latent = results["latent"]
    titles = {"train": "encoded training latents vs held-out (positive control)",
              "generated": "generated latents vs encoded held-out",
              "generated_on_sphere": "generated latents projected onto the unit sphere vs encoded held-out",
              "generated_vs_train": "generated latents vs encoded training latents"}
    rows = []
    for name, title in titles.items():
        if name not in latent:
            continue
        overall, moments = latent[name]["overall"], latent[name]["moments"]
        rows.append([title, _f(overall.get("knn_auc")), _f(overall.get("rf_auc")), _f(moments["mean_shift"]),
                     _f(moments["log2_var_ratio_median"]),
                     f"{_f(moments['log2_var_ratio_q05'])} .. {_f(moments['log2_var_ratio_q95'])}",
                     _f(moments["narrow_dims"]), _f(moments["norm"]["q50"])])
    norms = latent["heldout_norm"]
    return ["## (b) Latent space", "",
            *_table(["comparison", "kNN AUC", "RF AUC", "mean shift (sd)", "log2 var ratio (median)",
                     "log2 var ratio q05..q95", "dims < half var", "median norm"], rows), "",
            "Held-out latent norm quantiles: " + ", ".join(f"{k} {_f(v)}" for k, v in norms.items()), ""]


def _observation(results):
    rows = []
    for name, values in results["observation"].items():
        library = values["library_size_compared"]
        rows.append([name, f"{library['q05']:.0f} / {library['q50']:.0f} / {library['q95']:.0f}",
                     _f(values["cell_zero_fraction_compared"]), _f(values["gene_zero_fraction_pearson"]),
                     _f(values["gene_zero_fraction_mean_diff"]), _f(values["dispersion_spearman"]),
                     _f(values["dispersion_log2_ratio_median"])])
    reference = next(iter(results["observation"].values()))
    library = reference["library_size_reference"]
    rows.insert(0, ["heldout (reference)", f"{library['q05']:.0f} / {library['q50']:.0f} / {library['q95']:.0f}",
                    _f(reference["cell_zero_fraction_reference"]), "1", "0", "1", "0"])
    return ["## (c) Observation model (counts) vs the held-out cells", "",
            *_table(["set", "library size q05 / q50 / q95", "zero fraction", "gene zero-fraction r",
                     "gene zero-fraction diff", "dispersion Spearman", "dispersion log2 ratio"], rows), "",
            "Dispersion: CV^2 of size-normalized counts per gene, genes with a held-out mean of at least 0.1.", ""]


def _per_label(results):
    rows = []
    for row in sorted(results["per_label"], key=lambda r: -r["n_train"]):
        rows.append([row["label"], row["n_train"], row["n_heldout"], row["n_generated"],
                     _f(row.get("expression_train_knn_auc"), 2), _f(row.get("expression_generated_knn_auc"), 2),
                     _f(row.get("expression_reconstructed_train_counts_knn_auc"), 2),
                     _f(row.get("expression_reconstructed_heldout_counts_knn_auc"), 2),
                     _f(row.get("latent_train_knn_auc"), 2), _f(row.get("latent_generated_knn_auc"), 2)])
    return ["## (d) Per label (kNN AUC within the label, from the overall classifiers' out-of-fold predictions)", "",
            *_table(["label", "train", "held-out", "generated", "expr: train (control)", "expr: generated",
                     "expr: recon. train", "expr: recon. held-out", "latent: train (control)",
                     "latent: generated"], rows), ""]


def markdown_report(results):
    settings = results["settings"]
    lines = ["# Gap analysis: generated vs held-out real cells", "",
             f"Held-out {settings['heldout']}, training {settings['train']}, autoencoder {settings['vae_path']}, "
             f"samples {settings['samples']}, label key {settings['label_key']}, seed {settings['seed']}.",
             "AUC 0.5 = indistinguishable from held-out real cells; compare each figure with the positive control.", ""]
    for section in (_expression, _latent, _observation, _per_label):
        lines += section(results)
    return "\n".join(lines) + "\n"
