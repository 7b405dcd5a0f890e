"""Unseen-combination weights chosen on validation combinations (guidance_sweep.py --unseen_weights), recorded in
the checkpoint, and taken by the sampler by default."""
import shutil

import anndata
import numpy as np
import pandas as pd
import pytest

from exp_script import guidance_sweep
from exp_script.evaluation import unseen_guidance
from guided_diffusion.checkpoints import DiffusionCheckpoint, load_diffusion_model, record_unseen_guidance
from guided_diffusion.core.errors import UsageError
from synthetic import make_counts_adata
from test_guidance_composed import two_key_model  # noqa: F401 (the fixture: trained without type_2 x donor1)


def full_data(folder):
    """The fixture's data with the held-out combination (its real cells are the validation)."""
    path = folder / "full.h5ad"
    make_counts_adata(n_cells=150, n_genes=12, n_types=3, n_donors=2, seed=5).write_h5ad(path)
    return path


def test_the_rule_prefers_the_most_realistic_setting_called_right_often_enough():
    summary = pd.DataFrame({"unseen_guide_w": ["a", "b", "c"], "called_right": [0.5, 0.85, 0.97],
                            "real_called_right": [0.98] * 3, "knn_auc": [0.90, 0.93, 0.99]})
    assert unseen_guidance.recommend(summary)["unseen_guide_w"] == "b"  # a is called right too rarely
    summary["called_right"] = [0.1, 0.2, 0.3]
    assert unseen_guidance.recommend(summary)["unseen_guide_w"] == "c"  # none qualifies: called right most


def test_validation_combinations_are_the_unseen_ones(two_key_model, tmp_path):
    loaded = load_diffusion_model(str(two_key_model))
    obs = anndata.read_h5ad(full_data(tmp_path)).obs.astype(str)
    found = unseen_guidance.validation_combinations(loaded, obs)
    assert [values for _, values, _ in found] == [{"cell_type1": "type_2", "donor": "donor1"}]
    assert found[0][2] == int(((obs["cell_type1"] == "type_2") & (obs["donor"] == "donor1")).sum())
    with pytest.raises(UsageError, match="--unseen_condition cell_type1=type_0,donor=donor0"):
        unseen_guidance.validation_combinations(loaded, obs, ["cell_type1=type_0,donor=donor0"])  # a seen one
    seen_only = obs[~((obs["cell_type1"] == "type_2") & (obs["donor"] == "donor1"))]
    with pytest.raises(UsageError, match="never saw"):
        unseen_guidance.validation_combinations(loaded, seen_only)


def test_the_sweep_records_its_choice_and_the_sampler_takes_it(two_key_model, tmp_path):
    import cell_sample

    model = tmp_path / "m" / two_key_model.name
    shutil.copytree(two_key_model.parent, model.parent)
    ema = next(model.parent.glob("ema_*_000004.pt"))
    table, summary, chosen = guidance_sweep.main([
        "--model_path", str(model), "--validation", str(full_data(tmp_path)), "--out", str(tmp_path / "sweep"),
        "--unseen_weights", "cell_type1=0.5,donor=1", "cell_type1=0.5,donor=3", "--seeds", "0",
        "--max_per_condition", "8", "--timestep_respacing", "5", "--record", "True"])
    assert list(table["unseen_guide_w"]) == ["cell_type1=0.5,donor=1", "cell_type1=0.5,donor=3"]
    assert table[["called_right", "real_called_right", "knn_auc"]].notna().all().all()
    assert "**(chosen)**" in (tmp_path / "sweep" / "unseen_sweep.md").read_text()
    donor = float(chosen["unseen_guide_w"].split("donor=")[1])
    for path in (model, ema):  # both files hold it: the sampler reads the EMA one by default
        defaults = DiffusionCheckpoint.load(str(path)).sampling_defaults
        assert defaults["unseen_guide_w"] == {"cell_type1": 0.5, "donor": donor}
        assert defaults["unseen_guide_w_choice"]["combinations"] == ["cell_type1=type_2, donor=donor1"]

    def sample(name, *extra):
        cell_sample.main(["--model_path", str(model), "--sample_dir", str(tmp_path / name), "--num_samples", "4",
                          "--progress", "False", "--condition", "cell_type1=type_2,donor=donor1", *extra])
        return anndata.read_h5ad(tmp_path / name / "generated.h5ad").uns["cfdiffusion"]

    recorded, flagged = sample("recorded"), sample("flagged", "--unseen_guide_w", "donor=2")
    assert dict(recorded["unseen_guide_w"]) == {"cell_type1": 0.5, "donor": donor}
    assert recorded["unseen_guide_w_source"].startswith("the checkpoint")
    assert dict(flagged["unseen_guide_w"]) == {"cell_type1": 0.0, "donor": 2.0}
    assert flagged["unseen_guide_w_source"] == "--unseen_guide_w"
    # the interval the weights were chosen under is recorded with them and sampled with them
    for path in (model, ema):
        assert DiffusionCheckpoint.load(str(path)).sampling_defaults["unseen_guidance_interval"] == [0.0, 0.5]
    assert list(recorded["unseen_guidance_interval"]) == [0.0, 0.5]
    assert list(flagged["unseen_guidance_interval"]) == [0.0, 0.5]  # explicit weights: the default interval
    given = sample("interval", "--unseen_guidance_interval", "0.2,1")
    assert list(given["unseen_guidance_interval"]) == [0.2, 1.0]


def test_weights_recorded_without_an_interval_keep_guiding_every_step(two_key_model, tmp_path):
    """Weights recorded before the interval existed were chosen guiding every step: sampled that way."""
    import cell_sample

    model = tmp_path / "m" / two_key_model.name
    shutil.copytree(two_key_model.parent, model.parent)
    record_unseen_guidance(str(model), {"cell_type1": 0.5, "donor": 2.0}, {"rule": "test"})
    for path in [model, *model.parent.glob("ema_*.pt")]:
        checkpoint = DiffusionCheckpoint.load(str(path))
        if "unseen_guidance_interval" in checkpoint.sampling_defaults:
            del checkpoint.sampling_defaults["unseen_guidance_interval"]
            checkpoint.save(str(path))
    cell_sample.main(["--model_path", str(model), "--sample_dir", str(tmp_path / "old"), "--num_samples", "4",
                      "--progress", "False", "--condition", "cell_type1=type_2,donor=donor1"])
    record = anndata.read_h5ad(tmp_path / "old" / "generated.h5ad").uns["cfdiffusion"]
    assert list(record["unseen_guidance_interval"]) == [0.0, 1.0]
    assert dict(record["unseen_guide_w"]) == {"cell_type1": 0.5, "donor": 2.0}


def test_a_bad_recorded_interval_is_refused(two_key_model, tmp_path):
    model = tmp_path / "m" / two_key_model.name
    shutil.copytree(two_key_model.parent, model.parent)
    with pytest.raises(UsageError, match="unseen_guidance_interval"):
        record_unseen_guidance(str(model), {"cell_type1": 0.5, "donor": 2.0}, {}, interval=(0.6, 0.2))
    assert "unseen_guide_w" not in DiffusionCheckpoint.load(str(model)).sampling_defaults, "nothing written"


def test_recorded_weights_are_checked(two_key_model, tmp_path):
    model = tmp_path / "m" / two_key_model.name
    shutil.copytree(two_key_model.parent, model.parent)
    with pytest.raises(UsageError, match="label keys"):
        record_unseen_guidance(str(model), {"donor": 2.0}, {})
    with pytest.raises(UsageError, match="unseen_guide_w"):
        record_unseen_guidance(str(model), {"cell_type1": 0.5, "donor": -1.0}, {})
    assert "unseen_guide_w" not in DiffusionCheckpoint.load(str(model)).sampling_defaults, "nothing written"


def test_the_unseen_sweep_needs_two_keys_and_one_mode(tmp_path, capsys):
    from test_checkpoints import LEGACY, MODEL, VAE, refused

    line = refused(capsys, guidance_sweep.main, [
        "--model_path", str(LEGACY / MODEL), "--vae_path", str(LEGACY / VAE), "--validation",
        str(LEGACY / "counts.h5ad"), "--out", str(tmp_path / "s")])
    assert line.startswith("error: give either --weights")
    line = refused(capsys, guidance_sweep.main, [
        "--model_path", str(LEGACY / MODEL), "--vae_path", str(LEGACY / VAE), "--validation",
        str(LEGACY / "counts.h5ad"), "--out", str(tmp_path / "s"), "--weights", "1", "--record", "True"])
    assert line == "error: --record, --unseen_condition and --unseen_guidance_interval go with --unseen_weights"
