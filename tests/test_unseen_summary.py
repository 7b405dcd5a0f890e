"""benchmarks/unseen_summary.py: the table it makes from score files (mean ± sd over seeds)."""
import json

from benchmarks import unseen_summary


def write(root, combination, seed, setting, summary):
    folder = root / combination / f"seed{seed}" / setting / "score"
    folder.mkdir(parents=True)
    (folder / "unseen_combination.json").write_text(json.dumps({"summary": summary}))


def test_rows_per_combination_and_setting_with_mean_and_spread(tmp_path):
    base = {"held_out_real_called_correctly": 0.95, "seen_generated_called_wrong_mean": 0.01,
            "held_out_knn_auc": 0.9, "seen_knn_auc_mean": 0.8}
    write(tmp_path, "beta_human4", 0, "default", {**base, "held_out_generated_called_correctly": 0.8})
    write(tmp_path, "beta_human4", 1, "default", {**base, "held_out_generated_called_correctly": 0.6})
    write(tmp_path, "beta_human4", 0, "nested", {**base, "held_out_generated_called_correctly": 0.1})
    table = unseen_summary.collect(tmp_path)
    assert table[("beta_human4", "default")]["held_out_generated_called_correctly"] == [0.8, 0.6]
    text = unseen_summary.markdown(table)
    assert "| beta_human4 | default | 0.700 ± 0.100 (n=2) |" in text
    assert "| beta_human4 | nested | 0.100 |" in text
