"""benchmarks/fidelity_table.py: the per-run rows and the acceptance rule of benchmarks/bench_fidelity.sh."""
import json

from benchmarks import fidelity_table

METRICS = ["knn_auc", "rf_auc", "scc", "celltypist_accuracy", "de_lfc_pearson"]


def write_run(folder, figures, seconds, control=None):
    (folder / "evaluation").mkdir(parents=True)
    sections = {"generated": {"overall": figures}, "split": {"generated_cells_total": 100}}
    sections["train_vs_heldout"] = {"overall": control or figures}
    (folder / "evaluation" / "metrics.json").write_text(json.dumps(sections))
    (folder / "sample_seconds").write_text(f"1000.0 {1000.0 + seconds}")


def test_rows_and_summary_apply_the_limits_to_the_means_over_seeds(tmp_path, capsys):
    faithful = dict(knn_auc=0.75, rf_auc=0.80, scc=0.953, celltypist_accuracy=0.88, de_lfc_pearson=0.95)
    runs = {"faithful": (faithful, 200.0),
            "default": (dict(faithful, knn_auc=0.76), 10.0),
            "dpmpp2m_logsnr10": (dict(faithful, knn_auc=0.77, celltypist_accuracy=0.865), 5.0),
            "dpmpp2m_logsnr20": (dict(faithful, celltypist_accuracy=0.85), 8.0),  # CellTypist -0.03
            "ddim20": (dict(faithful, scc=0.949), 8.0)}  # SCC -0.004
    control = dict(knn_auc=0.52, rf_auc=0.54, scc=0.96, celltypist_accuracy=0.89, de_lfc_pearson=0.97)
    lines = ["\t".join(["dataset", "configuration", "seed", "sample_seconds", "cells"] + METRICS)]
    for seed in ("0", "1"):
        for name, (figures, seconds) in runs.items():
            folder = tmp_path / "baron" / "runs" / f"{name}_seed{seed}"
            write_run(folder, figures, seconds * (1 + int(seed)), control)
            fidelity_table.row(folder, "baron", name, seed, METRICS)
            lines.append(capsys.readouterr().out.strip())
    assert lines[1].split("\t")[:6] == ["baron", "faithful", "0", "200.00", "100", "0.7500"]
    (tmp_path / "fidelity.tsv").write_text("\n".join(lines) + "\n")

    fidelity_table.summary(tmp_path / "fidelity.tsv", tmp_path, METRICS)
    out = capsys.readouterr().out
    verdicts = {line.split()[0]: line.split()[1] for line in out.splitlines()
                if line.startswith("  ") and ("accepted" in line or "REJECTED" in line)}
    assert verdicts == {"faithful": "accepted", "default": "accepted", "dpmpp2m_logsnr10": "accepted",
                        "dpmpp2m_logsnr20": "REJECTED", "ddim20": "REJECTED"}
    assert "celltypist_accuracy -0.0300 (fails)" in out and "scc -0.0040 (fails)" in out
    logsnr10 = next(line for line in out.splitlines() if line.strip().startswith("dpmpp2m_logsnr10 "))
    assert logsnr10.split()[1:5] == ["10", "2", "7.5", "2.00x"]  # NFE, seeds, median seconds, vs default
    assert "control: training vs held-out" in out and "0.5200" in out
    assert fidelity_table.network_evaluations("default") == 10  # DPM-Solver++(2M) logsnr10
    assert fidelity_table.network_evaluations("ddpm50_cache5") == 50
    assert fidelity_table.network_evaluations("decoder_fp32") == 10  # the default's steps, fp32 decoder
