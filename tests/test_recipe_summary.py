"""benchmarks/recipe_summary.py: the table of bench_recipes.sh from the runs' metrics.json files."""
import json

from benchmarks import recipe_summary


def write_run(folder, knn, control_knn, fraction_closer, f1):
    (folder / "evaluation").mkdir(parents=True)
    overall = {"knn_auc": knn, "rf_auc": knn + 0.05, "ilisi": 0.8, "celltypist_accuracy": 0.9, "de_lfc_pearson": 0.95}
    metrics = {"generated": {"overall": overall},
               "train_vs_heldout": {"overall": dict(overall, knn_auc=control_knn)},
               "novelty": {"sections": {"generated": {"fraction_closer": fraction_closer, "distance_ratio": 0.9,
                                                      "passes": fraction_closer <= 0.1}}},
               "usefulness": {"train_on_synthetic": {"generated": {"macro_f1": f1},
                                                     "real training cells": {"macro_f1": 0.9}}}}
    (folder / "evaluation" / "metrics.json").write_text(json.dumps(metrics))


def test_summary_has_mean_and_sd_per_recipe_and_the_control(tmp_path):
    for seed, (knn, closer) in enumerate([(0.70, 0.05), (0.74, 0.15)]):
        run = tmp_path / f"seed{seed}"
        write_run(run / "last_d8000", knn, 0.50 + seed / 100, closer, 0.85)
        write_run(run / "best_d16000", knn - 0.1, 0.50 + seed / 100, 0.02, 0.88)
        (run / "autoencoder").mkdir()
        (run / "autoencoder" / "train_log.csv").write_text(
            "step,train_loss,val_loss,seconds\n20,0.3,0.31,1\n40,0.29,0.30,2\n60,0.28,0.305,3\n")
        (run / "times.tsv").write_text("diffusion last_d8000\t100\ndiffusion best_d16000\t200\n")
    text = recipe_summary.summarize(str(tmp_path), patience=150, ae_steps=600)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "seed 0: 40" in text and "seed 1: 40" in text
    assert rows["last_d8000"].split(" | ")[2] == "0.720 ± 0.028"
    assert rows["best_d16000"].split(" | ")[2] == "0.620 ± 0.028"
    assert " | 1/2 | 100 ± 0 |" in rows["last_d8000"] and " | 2/2 | " in rows["best_d16000"]
    assert rows["train vs held-out (positive control)"].split(" | ")[2] == "0.505 ± 0.007"
    assert (tmp_path / "summary.md").read_text() == text
    assert text.index("| last_d8000") < text.index("| best_d16000")


def test_labels_not_below_the_collapsed_control_counts_only_labels_with_enough_heldout_cells():
    def label(n, knn):
        return {"n_reference": n, "n_compared": n, "knn_auc": knn}

    metrics = {"generated": {"per_label": {"a": label(6, 0.7), "b": label(6, 0.5), "rare": label(2, 0.99)}},
               "real_vs_real": {"per_label": {"a": label(6, 0.5), "b": label(6, 0.5), "rare": label(2, 0.5)}},
               "collapsed": {"per_label": {"a": label(6, 0.6), "b": label(6, 0.9), "rare": label(2, 0.6)}}}
    assert recipe_summary.labels_not_below_collapsed(metrics) == 1  # a fails; rare has 4 held-out cells
    assert recipe_summary.labels_not_below_collapsed(metrics, min_heldout=4) == 2
    assert recipe_summary.labels_not_below_collapsed({"generated": {"per_label": {}}}) is None
