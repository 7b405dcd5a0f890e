"""benchmarks/unseen_summary.py: the table it makes from score files (mean ± sd over seeds)."""
import json

from benchmarks import unseen_summary


def write(root, combination, seed, setting, summary, flat=False):
    folder = (root if flat else root / combination) / f"seed{seed}" / setting / "score"
    folder.mkdir(parents=True)
    cell_type, donor = combination.split("_")
    (folder / "unseen_combination.json").write_text(json.dumps({"summary": summary, "setting": {
        "cell_type": cell_type, "donor": donor}}))


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


def test_the_choice_benchmark_layout_names_the_scored_combination(tmp_path):
    base = {"held_out_real_called_correctly": 0.98, "held_out_knn_auc": 0.95}
    write(tmp_path, "alpha_human2", 0, "judge", {**base, "held_out_generated_called_correctly": 0.87}, flat=True)
    write(tmp_path, "alpha_human2", 1, "judge", {**base, "held_out_generated_called_correctly": 0.5}, flat=True)
    write(tmp_path, "beta_human4", 0, "choose_donor4", {**base, "held_out_generated_called_correctly": 0.9}, flat=True)
    table = unseen_summary.collect(tmp_path)
    assert table[("alpha_human2", "judge")]["held_out_generated_called_correctly"] == [0.87, 0.5]
    assert "| alpha_human2 | judge | 0.685 ± 0.185 (n=2) |" in unseen_summary.markdown(table)
    assert ("beta_human4", "choose_donor4") in table
