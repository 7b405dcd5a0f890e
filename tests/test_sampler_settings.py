"""One sampler choice: ``--sampler`` (ddpm, ddim, dpmpp2m, dpmpp2m_sde), the original flags (--use_ddim, --solver,
--timestep_respacing's prefix) as aliases that run bit for bit what the new spelling runs, contradictions and
settings that cannot apply refused in one line, the run's record saying what ran, and cell_sample.py --threads."""
import json
import re

import anndata
import numpy as np
import pytest
import torch

import cell_sample
from test_checkpoints import MODEL, VAE, legacy, refused  # noqa: F401

RECORDED = {"cache_interval": 5, "branch": 0, "non_uniform": False}


def settings_of(*flags):
    return cell_sample.settings_from_args(cell_sample.build_parser().parse_args(["--model_path", "m.pt", *flags]))


def resolved(*flags):
    from guided_diffusion.sampling.settings import resolve_settings

    return resolve_settings(settings_of(*flags), RECORDED, "cpu")


def run(folder, out, *flags):
    """Sample the tiny legacy model (6 conditions x 3 cells); returns (generated AnnData, latents, manifest)."""
    path = cell_sample.main(["--model_path", str(folder / MODEL), "--vae_path", str(folder / VAE), "--sample_dir",
                             str(out), "--num_samples", "3", "--progress", "False", "--seed", "5", *flags])
    manifest = json.loads((out / "manifest.json").read_text())
    latents = {name: np.load(out / name) for name in sorted(manifest["files"]) if name.endswith(".npy")}
    return anndata.read_h5ad(path), latents, manifest


# ---- the aliases choose what --sampler chooses ------------------------------------------------------
@pytest.mark.parametrize("flags, sampler, steps", [
    ([], "dpmpp2m_sde", "logsnr10"),  # the default
    (["--use_ddim", "False", "--timestep_respacing", "1000", "--cache_interval", "5", "--precision", "fp32"], "ddpm",
     "1000"),  # the original sampler
    (["--timestep_respacing", "50"], "ddpm", "50"),
    (["--use_ddim", "True", "--timestep_respacing", "ddim50"], "ddim", "ddim50"),
    (["--use_ddim", "True", "--timestep_respacing", "50"], "ddim", "50"),
    (["--solver", "dpmpp2m"], "dpmpp2m", "logsnr10"),
    (["--solver", "dpmpp2m_sde", "--timestep_respacing", "20"], "dpmpp2m_sde", "20"),
    (["--solver", "ddpm", "--timestep_respacing", "20"], "ddpm", "20"),
    (["--solver", "", "--use_ddim", "True", "--timestep_respacing", "ddim20"], "ddim", "ddim20"),
    (["--solver", "auto", "--timestep_respacing", "logsnr15"], "dpmpp2m_sde", "logsnr15"),
    (["--solver", "dpmpp2m", "--use_ddim", "True", "--timestep_respacing", "ddim20"], "dpmpp2m", "ddim20"),
])
def test_the_original_flags_resolve_to_one_sampler(flags, sampler, steps):
    from guided_diffusion.sampling.settings import sampler_of

    settings = resolved(*flags)
    assert (settings.sampler, settings.timestep_respacing) == (sampler, steps)
    assert sampler_of(settings_of(*flags)) == sampler  # also before resolving: what the reverse loop runs
    # the aliases agree with the choice once resolved, and resolving again changes nothing
    assert settings.use_ddim == (sampler == "ddim")
    assert settings.solver == (sampler if sampler.startswith("dpm") else "")
    from guided_diffusion.sampling.settings import resolve_settings
    assert resolve_settings(settings, RECORDED, "cpu") == settings


def test_the_sampler_flag_is_recorded_and_described():
    assert settings_of("--sampler", "ddim").sampler == "ddim" and settings_of().sampler is None
    assert resolved("--sampler", "ddim", "--timestep_respacing", "ddim20").describe().startswith("DDIM ddim20 steps")
    assert resolved("--sampler", "dpmpp2m").describe().startswith("DPM-Solver++(2M) logsnr10 steps")
    assert resolved().describe().startswith("SDE-DPM-Solver++(2M) logsnr10 steps, cache 1,")
    assert "branch 0" in resolved("--sampler", "ddpm", "--timestep_respacing", "1000").describe()


@pytest.mark.parametrize("old, new", [
    (["--timestep_respacing", "10"], ["--sampler", "ddpm", "--timestep_respacing", "10"]),
    (["--use_ddim", "True", "--timestep_respacing", "ddim10"], ["--sampler", "ddim", "--timestep_respacing", "ddim10"]),
    (["--use_ddim", "True", "--timestep_respacing", "ddim10", "--eta", "0.5"],
     ["--sampler", "ddim", "--timestep_respacing", "ddim10", "--eta", "0.5"]),
    (["--solver", "dpmpp2m", "--timestep_respacing", "logsnr8"], ["--sampler", "dpmpp2m", "--timestep_respacing",
                                                                  "logsnr8"]),
    ([], ["--sampler", "dpmpp2m_sde"]),
    (["--solver", "dpmpp2m_sde", "--timestep_respacing", "10", "--cache_interval", "2"],
     ["--sampler", "dpmpp2m_sde", "--timestep_respacing", "10", "--cache_interval", "2"]),
])
def test_the_original_flags_and_the_sampler_flag_give_the_same_cells_bit_for_bit(legacy, tmp_path, old, new):
    before, before_latents, before_manifest = run(legacy, tmp_path / "old", *old)
    after, after_latents, after_manifest = run(legacy, tmp_path / "new", *new)
    assert before_latents.keys() == after_latents.keys() and before_latents
    for name, latents in before_latents.items():
        np.testing.assert_array_equal(latents, after_latents[name], err_msg=name)
    np.testing.assert_array_equal(before.layers["counts"].toarray(), after.layers["counts"].toarray())
    np.testing.assert_array_equal(before.X.toarray(), after.X.toarray())
    assert before_manifest["run"] == after_manifest["run"]  # the same record, whichever spelling ran it


def test_the_samplers_differ_so_the_comparison_above_can_fail(legacy, tmp_path):
    cells = [run(legacy, tmp_path / name, "--sampler", name, "--timestep_respacing", "10")[1]
             for name in ("ddpm", "ddim", "dpmpp2m", "dpmpp2m_sde")]
    for index, one in enumerate(cells):
        for other in cells[index + 1:]:
            assert not np.array_equal(next(iter(one.values())), next(iter(other.values())))


# ---- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--sampler", "ddpm", "--use_ddim", "True", "--timestep_respacing", "50"],
     "--sampler ddpm contradicts --use_ddim True (ddim); give --sampler alone"),
    (["--sampler", "dpmpp2m", "--use_ddim", "True"], "--sampler dpmpp2m contradicts --use_ddim True"),
    (["--sampler", "ddim", "--use_ddim", "False", "--timestep_respacing", "ddim50"],
     "--sampler ddim contradicts --use_ddim False (not ddim); give --sampler alone"),
    (["--sampler", "ddim", "--solver", "dpmpp2m"], "--sampler ddim contradicts --solver dpmpp2m; give --sampler alone"),
    (["--sampler", "dpmpp2m", "--solver", "dpmpp2m_sde"], "--sampler dpmpp2m contradicts --solver dpmpp2m_sde"),
    (["--sampler", "dpmpp2m_sde", "--solver", "ddpm"], "--sampler dpmpp2m_sde contradicts --solver ddpm (ddpm or "
                                                       "ddim)"),
    (["--sampler", "dpmpp2m", "--solver", ""], "--sampler dpmpp2m contradicts --solver '' (ddpm or ddim)"),
    (["--sampler", "ddpm"], "--timestep_respacing logsnr10 spaces the steps in log-SNR for --sampler dpmpp2m or "
                            "dpmpp2m_sde; with --sampler ddpm give 10 (uniform) or ddim10 (strided)"),
    (["--sampler", "ddim", "--timestep_respacing", "logsnr20"], "with --sampler ddim give 20 (uniform) or ddim20"),
    (["--eta", "1.0"], "--eta 1 applies to --sampler ddim only (also spelled --use_ddim True); this run's sampler, "
                       "dpmpp2m_sde, does not use it: drop --eta"),
    (["--eta", "0.5", "--timestep_respacing", "1000"], "this run's sampler, ddpm, does not use it"),
    (["--eta", "0.5", "--sampler", "dpmpp2m"], "this run's sampler, dpmpp2m, does not use it"),
    # the original flags' refusals are unchanged
    (["--timestep_respacing", "ddim50"], "--timestep_respacing ddim50 spaces the steps for DDIM, but --use_ddim is "
                                         "False; add --use_ddim True, or give 50 for DDPM"),
    (["--use_ddim", "True"], "with --use_ddim True give DDIM steps, e.g. --timestep_respacing ddim10"),
])
def test_contradictions_and_settings_that_cannot_apply_are_refused(flags, message):
    from guided_diffusion.core.errors import UsageError

    with pytest.raises(UsageError) as error:
        resolved(*flags)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("flags", [
    ["--sampler", "ddim", "--use_ddim", "True", "--timestep_respacing", "ddim20", "--eta", "1"],
    ["--sampler", "dpmpp2m", "--solver", "dpmpp2m"],
    ["--sampler", "dpmpp2m_sde", "--use_ddim", "False", "--solver", "auto"],
    ["--sampler", "ddpm", "--use_ddim", "False", "--solver", "ddpm", "--timestep_respacing", "1000"],
    ["--sampler", "ddim", "--solver", "ddpm", "--timestep_respacing", "20"],
    ["--sampler", "ddpm", "--timestep_respacing", "ddim20"],  # strided steps for DDPM: a spacing, no contradiction
    ["--sampler", "dpmpp2m", "--timestep_respacing", "ddim20"],
    ["--use_ddim", "True", "--timestep_respacing", "ddim20", "--eta", "0.3"],
])
def test_agreeing_flags_are_accepted(flags):
    settings = resolved(*flags)
    assert settings.sampler == (flags[flags.index("--sampler") + 1] if "--sampler" in flags else "ddim")


def test_a_contradiction_on_the_command_line_is_one_line_and_writes_nothing(legacy, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused(capsys, run, legacy, out, "--sampler", "ddpm", "--use_ddim", "True")
    assert line == "error: --sampler ddpm contradicts --use_ddim True (ddim); give --sampler alone"
    line = refused(capsys, run, legacy, out, "--sampler", "heun")
    assert line.startswith("error: argument --sampler: invalid choice: 'heun'")
    line = refused(capsys, run, legacy, out, "--eta", "1")
    assert "--eta 1 applies to --sampler ddim only" in line
    assert not out.exists() or not list(out.iterdir())


def test_cache_flags_without_feature_reuse_are_warned_about(capsys):
    settings = resolved("--branch", "1", "--non_uniform", "True")  # logsnr10: the recorded 5 of 1000 -> 1
    assert settings.cache_interval == 1
    assert ("warning: --branch and --non_uniform set how deep features are reused, but the cache interval is 1 "
            "(no reuse) on 10 steps: they have no effect") in capsys.readouterr().err
    resolved("--non_uniform", "False")
    assert "warning: --non_uniform sets how deep features are reused" in capsys.readouterr().err
    resolved("--branch", "1", "--cache_interval", "2")
    resolved("--sampler", "ddpm", "--timestep_respacing", "1000", "--non_uniform", "True")
    assert capsys.readouterr().err == ""


# ---- the record -----------------------------------------------------------------------------------------
def test_the_default_run_records_what_ran(legacy, tmp_path):
    generated, _, manifest = run(legacy, tmp_path / "out", "--timestep_respacing", "logsnr8")
    record = generated.uns["cfdiffusion"]
    assert (record["sampler"], record["steps"], record["spacing"], record["timestep_respacing"]) == (
        "dpmpp2m_sde", 8, "log-snr", "logsnr8")
    assert record["cache_interval"] == 1 and record["guide_w"] == 0.5 and record["seed"] == 5
    assert record["precision"] in ("fp32", "bf16") and record["decoder_precision"] in ("fp32", "bf16")
    # nothing that did not apply, nothing that says otherwise
    assert not {"eta", "use_ddim", "solver", "branch", "non_uniform"} & set(record)
    assert manifest["run"]["sampler"] == "dpmpp2m_sde" and manifest["run"].keys() == record.keys()


def test_a_ddim_run_records_eta_and_a_cached_run_its_branch(legacy, tmp_path):
    generated, _, manifest = run(legacy, tmp_path / "ddim", "--use_ddim", "True", "--timestep_respacing", "ddim20",
                                 "--eta", "0.5", "--cache_interval", "3", "--branch", "0", "--non_uniform", "False",
                                 "--precision", "fp32", "--guide_w", "cell_type1=1,donor=2")
    record = generated.uns["cfdiffusion"]
    assert (record["sampler"], record["steps"], record["spacing"], record["eta"]) == ("ddim", 20, "strided", 0.5)
    assert (record["cache_interval"], record["branch"], record["non_uniform"]) == (3, 0, False)
    assert (record["precision"], record["decoder_precision"]) == ("fp32", "fp32")
    assert dict(record["guide_w"]) == {"cell_type1": 1.0, "donor": 2.0}
    assert manifest["run"]["guide_w"] == {"cell_type1": 1.0, "donor": 2.0} and manifest["run"]["eta"] == 0.5
    ddpm = run(legacy, tmp_path / "ddpm", "--timestep_respacing", "25")[0].uns["cfdiffusion"]
    assert (ddpm["sampler"], ddpm["steps"], ddpm["spacing"]) == ("ddpm", 25, "uniform") and "eta" not in ddpm


def test_the_guidance_sweep_takes_the_sampler(monkeypatch):
    from exp_script import guidance_sweep

    seen = {}
    monkeypatch.setattr(guidance_sweep, "sweep", lambda *args, **options: seen.update(options))
    guidance_sweep.main(["--model_path", "m.pt", "--validation", "v.h5ad", "--weights", "0", "1", "--out", "o",
                         "--sampler", "ddim", "--timestep_respacing", "ddim20"])
    assert seen["sampler"] == "ddim" and seen["timestep_respacing"] == "ddim20"
    guidance_sweep.main(["--model_path", "m.pt", "--validation", "v.h5ad", "--weights", "0", "--out", "o"])
    assert seen["sampler"] is None


# ---- --threads and the help text --------------------------------------------------------------------------
def test_cell_sample_takes_threads(legacy, tmp_path, capsys, monkeypatch):
    from guided_diffusion.core import threads

    monkeypatch.setitem(threads._explicit, "threads", None)  # an explicit count is remembered per process
    run(legacy, tmp_path / "out", "--threads", "2", "--timestep_respacing", "5")
    assert torch.get_num_threads() == 2
    line = refused(capsys, run, legacy, tmp_path / "bad", "--threads", "0")
    assert line.startswith("error: argument --threads: must be a positive integer")


def test_the_help_points_to_the_docs_without_dates():
    text = cell_sample.build_parser().format_help()
    for flag in ("--sampler", "--threads", "--use_ddim", "--solver", "--eta"):
        assert flag in text
    assert "docs/sampling.md" in text and "README, Speed" not in text and "Speed\"" not in text
    assert not re.search(r"20[0-9][0-9]-[01][0-9]", text)
    import inspect
    from guided_diffusion.sampling import settings
    assert not re.search(r"20[0-9][0-9]-[01][0-9]|README, \"?Speed", inspect.getsource(settings))
