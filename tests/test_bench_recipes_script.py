"""benchmarks/bench_recipes.sh's choice of dataset: a dataset that is not bundled needs its file and label key, said
in one line before anything is written."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(tmp_path, **env):
    return subprocess.run(["bash", os.path.join(REPO, "benchmarks", "bench_recipes.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=dict(os.environ, **env), timeout=60)


def test_an_unbundled_dataset_without_its_file_is_refused_in_one_line(tmp_path):
    for env in ({"DATASET": "cbmc"}, {"DATASET": "cbmc", "DATA_FILE": "x.h5ad"}, {"DATASET": "cbmc", "LABEL_KEY": "t"}):
        result = run_script(tmp_path, **env)
        assert result.returncode == 2
        assert result.stderr.strip() == ("error: DATASET cbmc is not bundled (baron, pbmc3k): set DATA_FILE and "
                                         "LABEL_KEY")
        assert not (tmp_path / "out").exists()


def test_an_unbundled_dataset_reads_its_own_file(tmp_path):
    # the split is the first step: a missing file fails there, naming the file given, not a bundled one
    result = run_script(tmp_path, DATASET="cbmc", DATA_FILE=str(tmp_path / "missing.h5ad"), LABEL_KEY="cell_type",
                        PY=sys.executable)
    assert result.returncode != 0
    assert "missing.h5ad" in result.stderr and "Traceback" not in result.stderr
