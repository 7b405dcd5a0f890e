"""benchmarks/peer_scvi.py without scvi-tools (the project's .venv lacks it on purpose): --help runs, and a run says
in one line how to get the optional environment (docs/peer_baseline.md)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "peer_scvi.py")


def run_script(args, tmp_path, hide_scvi):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    if hide_scvi:  # an importable `scvi` that fails as a missing package does, whatever this interpreter has
        stub = tmp_path / "stub" / "scvi"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'scvi'\", name='scvi')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "stub"), REPO])
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_help_runs_without_scvi(tmp_path):
    result = run_script(["--help"], tmp_path, hide_scvi=True)
    assert result.returncode == 0, result.stderr
    assert "--max_epochs" in result.stdout and "--label_key" in result.stdout


@pytest.mark.parametrize("hide_scvi", [True, False])
def test_missing_scvi_is_one_line(tmp_path, hide_scvi):
    if not hide_scvi:
        try:
            import scvi  # noqa: F401
            pytest.skip("this interpreter has scvi-tools")
        except ModuleNotFoundError:
            pass  # the project's .venv, as it is
    result = run_script(["--train", str(tmp_path / "train.h5ad"), "--out", str(tmp_path / "out")], tmp_path, hide_scvi)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: scvi-tools is not installed; run make bench-peer-env"
    assert not (tmp_path / "out").exists()
