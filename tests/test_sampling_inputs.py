"""Sampler inputs that would give a wrong result with exit 0 or puzzle a new user,
each reproduced on the tiny legacy checkpoint (tests/data/legacy_v1) and now refused, marked or warned."""
import json
import os

import anndata
import numpy as np
import pytest
import torch

import cell_sample
import cell_train
from test_checkpoints import LEGACY, MODEL, VAE, edit_both, legacy, refused, sample  # noqa: F401


def files(folder):
    return sorted(os.listdir(folder)) if os.path.exists(folder) else []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e30", "-5"])
def test_absurd_guidance_weights_are_refused(legacy, tmp_path, capsys, value):
    line = refused(capsys, sample, legacy, tmp_path / "out", f"--guide_w={value}")
    assert line.startswith("error: --guide_w must be a finite number in [-1, 100]"), line
    assert files(tmp_path / "out") == []


@pytest.mark.parametrize("observation", ["mean", "counts"])
def test_non_finite_decoded_values_are_never_written(legacy, tmp_path, capsys, monkeypatch, observation):
    from VAE import VAE_model

    monkeypatch.setattr(VAE_model.VAE, "decode", lambda self, z, labels=None: torch.full((len(z), 12), float("nan")))
    # an overflowing decoder: NB draws at an infinite mean come back as huge negative numbers
    overflow = torch.full((3, 12), -9.2e18).to_sparse_csr()
    monkeypatch.setattr(VAE_model.VAE, "sample_counts", lambda self, z, totals, generator, **options: overflow)
    line = refused(capsys, sample, legacy, tmp_path / "out", "--observation", observation)
    assert "decoded the generated latents to non-finite" in line and "nothing was written" in line
    assert [name for name in files(tmp_path / "out") if not name.startswith(".")] == []


def test_a_real_label_named_unconditioned_stays_distinguishable(legacy, tmp_path):
    edit_both(legacy, lambda p: p["vocabularies"].update(donor=["donor1", "unconditioned"]))
    out = sample(legacy, tmp_path / "a", "--condition", "cell_type1=type_0", "--condition",
                 "cell_type1=type_1,donor=unconditioned")
    obs = anndata.read_h5ad(out).obs
    left_out, real = obs["cell_type1"] == "type_0", obs["cell_type1"] == "type_1"
    assert obs.loc[left_out, "donor"].isna().all()  # unconditioned: a missing value, not a word
    assert (obs.loc[real, "donor"] == "unconditioned").all()


def test_a_label_key_named_like_a_sampler_column_is_refused_at_training(tmp_path, capsys):
    adata = anndata.read_h5ad(LEGACY / "counts.h5ad")
    adata.obs["library_size"] = adata.obs["donor"]
    data = tmp_path / "clash.h5ad"
    adata.write_h5ad(data)
    with pytest.raises(SystemExit) as exit_info:
        cell_train.main(["--data_dir", str(data), "--vae_path", str(LEGACY / VAE), "--save_dir", str(tmp_path / "d"),
                         "--model_name", "m", "--label_key", "library_size", "--lr_anneal_steps", "2",
                         "--hidden_dims", "8", "8", "--progress", "False"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: label key 'library_size' is a name the tools use in their output obs (the total counts drawn "
        "for each generated cell); copy the labels to a column of another name and use that")
    assert files(tmp_path / "d" / "m") == []


@pytest.mark.parametrize("flags, message", [
    (["--timestep_respacing", "ddim50"], "--timestep_respacing ddim50 spaces the steps for DDIM, but --use_ddim is "
                                         "False; add --use_ddim True, or give 50 for DDPM"),
    (["--timestep_respacing", ""], "--timestep_respacing '': give a step count"),
    (["--timestep_respacing", " 50"], "--timestep_respacing ' 50': give a step count"),
    (["--timestep_respacing", "10,10,10"], "section lists such as 10,10,10 are not supported"),
    (["--timestep_respacing", "0"], "--timestep_respacing '0': give a step count"),
    (["--condition", "cell_type1=type_0", "--condition", "cell_type1=type_0"],
     "--condition cell_type1=type_0 is given twice; give each condition once"),
    (["--condition", "cell_type1=type_0,cell_type1=type_1"], "key cell_type1 is given twice; give each key once"),
])
def test_ambiguous_sampler_flags_are_refused(legacy, tmp_path, capsys, flags, message):
    line = refused(capsys, sample, legacy, tmp_path / "out", *flags)
    assert message in line, line
    assert files(tmp_path / "out") == []


def test_a_negative_seed_is_a_one_line_error(legacy, tmp_path, capsys):
    line = refused(capsys, sample, legacy, tmp_path / "out", "--seed", "-1")
    assert "--seed: must be zero or positive, got -1" in line


def test_too_many_cells_for_memory_does_not_blame_the_batch_size(legacy, tmp_path, capsys):
    line = refused(capsys, sample, legacy, tmp_path / "out", "--num_samples", str(10 ** 12))
    assert "more than this machine's" in line and "--batch_size does not change that" in line
    assert "lower --num_samples" in line


def test_a_reused_sample_dir_holds_one_run(legacy, tmp_path, capsys):
    out = tmp_path / "out"
    sample(legacy, out, "--condition", "cell_type1=type_0,donor=donor0")
    sample(legacy, out, "--condition", "cell_type1=type_2")
    assert "removed 2 output files of an earlier run" in capsys.readouterr().err
    assert files(out) == ["cell2_x_cache1_uniform.npy", "generated.h5ad", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["cell2_x_cache1_uniform.npy", "generated.h5ad"]
    assert manifest["files"]["generated.h5ad"] == os.path.getsize(out / "generated.h5ad")
    assert manifest["run"]["n_cells"] == 3 and manifest["complete"] is True


def test_a_run_killed_while_writing_leaves_no_complete_looking_set(legacy, tmp_path, monkeypatch):
    import guided_diffusion.sampling.pipeline as sampling

    out = tmp_path / "out"
    sample(legacy, out, "--condition", "cell_type1=type_0,donor=donor0")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as SIGKILL would stop it, after generated.h5ad, before the latents

    monkeypatch.setattr(sampling, "write_latent_files", killed)
    with pytest.raises(KeyboardInterrupt):
        sample(legacy, out, "--condition", "cell_type1=type_1,donor=donor1")
    # issue 25: the new set is staged and swapped in only when complete, so the earlier set is kept whole
    assert files(out) == ["cell0_0_cache1_uniform.npy", "generated.h5ad", "manifest.json"]


def test_latents_far_outside_the_training_range_are_warned_about(legacy, tmp_path, capsys):
    edit_both(legacy, lambda p: p.update(latent_range={"levels": [0.001, 0.5, 0.999],
                                                       "quantiles": [[-1e-3] * 4, [0.0] * 4, [1e-3] * 4]}))
    sample(legacy, tmp_path / "narrow")
    err = capsys.readouterr().err
    assert "warning: 18 of 18 generated cells have latents far outside the training latents' range" in err
    assert "train longer, or lower --guide_w" in err
    edit_both(legacy, lambda p: p.update(latent_range={"levels": [0.001, 0.5, 0.999],
                                                       "quantiles": [[-1e4] * 4, [0.0] * 4, [1e4] * 4]}))
    out = sample(legacy, tmp_path / "wide")
    assert "far outside" not in capsys.readouterr().err
    assert len(anndata.read_h5ad(out).uns["cfdiffusion"]["warnings"]) == 0


def test_decoded_means_above_the_log_normalized_maximum_are_warned_about():
    from guided_diffusion.data import Normalization
    from guided_diffusion.sampling.pipeline import decoded_range_warnings

    class Decoder:
        normalization = Normalization(input_is_log=False, target_sum=1e4)

    assert decoded_range_warnings((0.0, 9.2), Decoder, "mean") == []
    (warning,) = decoded_range_warnings((0.0, 36.0), Decoder, "mean")
    assert warning.startswith("decoded values reach 36.0, above 9.21 = log1p(10000)")


def test_bf16_sampling_writes_fp32_decoded_values(legacy, tmp_path):
    out = sample(legacy, tmp_path / "bf16", "--precision", "bf16", "--observation", "mean", "--num_samples", "20")
    generated = anndata.read_h5ad(out)
    assert generated.uns["cfdiffusion"]["precision"] == "bf16"
    values = torch.from_numpy(np.asarray(generated.X))
    assert values.dtype == torch.float32
    rounded = values.bfloat16().float()
    assert (rounded != values).float().mean() > 0.5  # the decoder ran in fp32: most values are not bf16 numbers


def test_library_size_is_the_row_total_of_the_counts(legacy, tmp_path):
    generated = anndata.read_h5ad(sample(legacy, tmp_path / "out", "--observation", "counts"))
    totals = np.asarray(generated.layers["counts"].sum(axis=1)).ravel()
    np.testing.assert_array_equal(generated.obs["library_size"].to_numpy(), totals)
    assert (generated.obs["target_library_size"] > 0).all()


def test_help_shows_every_default_and_every_flag_has_help(capsys):
    parser = cell_sample.build_parser()
    undocumented = [action.dest for action in parser._actions if not action.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.5)" in text and "(default: logsnr10)" in text and "(default: 1000)" in text
    assert "17x" not in text and "21x" not in text  # the speed figure lives in the README only


def test_unseen_combinations_are_announced(legacy, tmp_path, capsys):
    edit_both(legacy, lambda p: p.update(condition_counts=[entry for entry in p["condition_counts"]
                                                           if entry[:2] != [2, 1]]))
    sample(legacy, tmp_path / "seen")
    assert "never seen" not in capsys.readouterr().err
    assert len(os.listdir(tmp_path / "seen")) == 5 + 2  # five seen conditions, generated.h5ad, manifest
    out = sample(legacy, tmp_path / "all", "--all_combinations", "True")
    err = capsys.readouterr().err
    assert "warning: 1 of 6 conditions were never seen in training (e.g. cell_type1=type_2,donor=donor1)" in err
    generated = anndata.read_h5ad(out)
    assert generated.obs.groupby(["cell_type1", "donor"], observed=True).size().tolist() == [3] * 6
