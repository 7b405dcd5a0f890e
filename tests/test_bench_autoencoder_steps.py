"""benchmarks/bench_autoencoder_steps.py: each checkpoint scored with its dispersion refitted on a copy, and the
summary's two chosen steps per seed."""
import hashlib
import sys

import numpy as np
import pandas as pd

from benchmarks import bench_autoencoder_steps as steps
from VAE.autoencoder_checkpoint import AutoencoderCheckpoint


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_summary_names_the_loss_step_and_the_realism_step_of_each_seed():
    rows = [dict(zip(steps.COLUMNS, values)) for values in [
        (0, 250, 0.30, 0.60, 0.62, 0.58, 0.60, 0.5, 0.5, 0.600),
        (0, 500, 0.29, 0.58, 0.60, 0.56, 0.58, 0.5, 0.5, 0.580),  # lowest loss
        (0, 750, 0.295, 0.55, 0.57, 0.55, 0.57, 0.5, 0.5, 0.560),  # lowest criterion
        (1, 250, 0.31, 0.62, 0.62, 0.60, 0.60, 0.5, 0.5, 0.610),
        (1, 500, 0.30, 0.56, 0.58, 0.56, 0.58, 0.5, 0.5, 0.570),  # both
        (1, 750, 0.305, 0.60, 0.60, 0.58, 0.58, 0.5, 0.5, 0.590)]]
    lines = steps.summary(rows).splitlines()
    step500 = lines[3].split(" | ")
    assert step500[0] == "| 500" and step500[1] == "0.29500" and step500[2] == "0.570 ± 0.014"
    assert step500[-1] == "2 |"
    assert "| 0 | 500 / 0.580 | 750 / 0.560 |" in lines
    assert "| 1 | 500 / 0.570 | 500 / 0.570 |" in lines


def test_every_checkpoint_is_scored_on_a_refitted_copy(counts_h5ad, tmp_path, monkeypatch, capsys):
    out = tmp_path / "steps"
    monkeypatch.setattr(sys, "argv", ["bench_autoencoder_steps.py", "--train", str(counts_h5ad), "--out", str(out),
                                      "--seeds", "0", "--max_steps", "20", "--every", "10",
                                      "--ae_flags", "--hidden_dims 16 --latent_dim 4"])
    run_file = out / "seed0" / "model_seed=0_step=10.pt"
    before = {}

    real_score_step = steps.score_step

    def score_step(args, path, fit, seed, folder):
        before[path] = digest(path)
        return real_score_step(args, path, fit, seed, folder)

    monkeypatch.setattr(steps, "score_step", score_step)
    steps.main()
    table = pd.read_csv(out / "steps.tsv", sep="\t")
    assert list(table["step"]) == [10, 20] and list(table["seed"]) == [0, 0]
    np.testing.assert_allclose(table["criterion"], table[steps.SCORES].mean(axis=1))
    assert table[steps.SCORES].apply(lambda c: c.between(0, 1)).all().all()
    assert table["val_loss"].notna().all()  # read from the run's train_log.csv at the checkpoint's step
    assert before[str(run_file)] == digest(run_file)  # the run's own file is left as it was
    copy = AutoencoderCheckpoint.load(str(out / "seed0" / "scored_step10" / "model.pt"))
    assert copy.step == 10 and copy.dispersion_fit is not None  # refitted, as a finished run's file is
    assert not AutoencoderCheckpoint.load(str(run_file)).dispersion_fit
    assert "| 0 | " in (out / "summary.md").read_text()
    # a second call reuses the rows: nothing is trained or scored again
    monkeypatch.setattr(steps, "score_step", lambda *a: (_ for _ in ()).throw(AssertionError("scored again")))
    steps.main()


def test_an_interrupted_run_is_resumed_not_started_again(counts_h5ad, tmp_path, monkeypatch):
    out = tmp_path / "steps"
    argv = ["bench_autoencoder_steps.py", "--train", str(counts_h5ad), "--out", str(out), "--seeds", "0",
            "--every", "10", "--ae_flags", "--hidden_dims 16 --latent_dim 4", "--max_steps"]
    monkeypatch.setattr(steps, "score_step", lambda *a: {key: 0.5 for key in steps.SCORES + [
        "control_knn_auc", "control_rf_auc"]})
    monkeypatch.setattr(sys, "argv", argv + ["10"])
    steps.main()
    first = out / "seed0" / "model_seed=0_step=10.pt"
    kept = digest(first)
    monkeypatch.setattr(sys, "argv", argv + ["20"])  # as if the first call had been stopped after step 10
    steps.main()
    assert digest(first) == kept  # continued from step 10, not trained again
    table = pd.read_csv(out / "steps.tsv", sep="\t")
    assert list(table["step"]) == [10, 20]
    assert table["val_loss"].notna().all()  # the resumed run's log continues the first one's


def test_the_refit_leaves_out_the_runs_own_validation_cells():
    assert steps.run_val_fraction("") == 0.1  # VAE_train.py's default
    assert steps.run_val_fraction("--hidden_dims 16 --val_fraction 0.2") == 0.2
    assert steps.run_val_fraction("--val_fraction=0.05 --latent_dim 4") == 0.05
