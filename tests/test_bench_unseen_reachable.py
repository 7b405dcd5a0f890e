"""benchmarks/bench_unseen_reachable.py: the real-cell references of every combination, on data whose donor effect
is additive (the additive reference is realistic) or type-specific (it is not)."""
import pandas as pd
import pytest

from benchmarks import bench_unseen_reachable
from test_guidance_sweep import donor_data


@pytest.mark.parametrize("type_specific", [False, True])
def test_one_row_per_combination_and_the_references_order(tmp_path, type_specific):
    data = tmp_path / "data.h5ad"
    donor_data(cells_per_combination=60, type_specific=type_specific, depth=10).write_h5ad(data)
    bench_unseen_reachable.main(["--data", str(data), "--out", str(tmp_path / "out"), "--min_cells", "30"])
    table = pd.read_csv(tmp_path / "out" / "reachable.tsv", sep="\t")
    assert len(table) == 6 and set(table["cells"]) == {60}
    assert (table["real_halves_knn_auc"] < 0.75).all() and (table["other_donors_real_knn_auc"] > 0.9).all()
    assert (table["own_mean_shift_called_correctly"] > 0.9).all()
    if type_specific:
        assert (table["additive_shift_called_correctly"] < 0.2).all()
    else:
        assert (table["additive_shift_called_correctly"] > 0.9).all() and (table["additive_shift_knn_auc"] < 0.8).all()
    assert "| **mean** |" in (tmp_path / "out" / "reachable.md").read_text()


def test_data_without_a_donor_shared_by_two_types_is_refused(tmp_path, capsys):
    data = tmp_path / "data.h5ad"
    donor_data(donors=("d0",)).write_h5ad(data)
    with pytest.raises(SystemExit) as raised:
        bench_unseen_reachable.main(["--data", str(data), "--out", str(tmp_path / "out")])
    assert "no (cell_type1, donor) combination" in str(raised.value)
