"""The shared training loop and both trainers' run handling: deadline, start step, resume checks,
divergence, the run-folder lock, the CSV log, the autoencoder checkpoint schema, microbatches, threads."""
import fcntl
import os
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

import cell_train
from guided_diffusion.core import threads as threads_module
from guided_diffusion.training import loop as training_loop
from guided_diffusion.core.container import load_checkpoint, save_checkpoint
from synthetic import REPO_ROOT, make_counts_adata
from VAE import VAE_train
from VAE.autoencoder_checkpoint import AutoencoderCheckpoint
from VAE.VAE_model import load_autoencoder

TINY_AE = ["--hidden_dims", "16", "16", "16", "--latent_dim", "8", "--batch_size", "16", "--progress", "False"]
TINY_UNET = ["--hidden_dims", "16", "16", "8", "8", "--batch_size", "16", "--progress", "False"]
LEGACY = REPO_ROOT / "tests" / "data" / "legacy_v1"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    data = root / "counts.h5ad"
    make_counts_adata(n_cells=90, n_genes=24, seed=2).write_h5ad(data)
    # a decoder that reads no labels: these diffusion models are trained on other keys and relabelled data
    vae = VAE_train.main(["--data_dir", str(data), "--save_dir", str(root / "ae"), "--max_steps", "4", *TINY_AE,
                          "--decoder_label_key", "none"])
    return {"root": root, "data": str(data), "vae": vae}


def ae(workspace, save_dir, *extra, data=None):
    return VAE_train.main(["--data_dir", data or workspace["data"], "--save_dir", str(save_dir), *TINY_AE,
                           *map(str, extra)])


def diffusion(workspace, save_dir, *extra, data=None, vae=None):
    return cell_train.main(["--data_dir", data or workspace["data"], "--vae_path", vae or workspace["vae"],
                            "--save_dir", str(save_dir), "--model_name", "run", *TINY_UNET, "--precision", "fp32",
                            *map(str, extra)])


def refused(capsys, run, expected, code=2):
    with pytest.raises(SystemExit) as exit_info:
        run()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    return lines[0]


def log_rows(folder):
    return np.atleast_1d(np.genfromtxt(Path(folder) / "train_log.csv", delimiter=",", names=True))


# ---- the autoencoder checkpoint schema ---------------------------------------------------------------------
def test_optimizer_state_is_kept_beside_the_model(workspace, tmp_path):
    path = ae(workspace, tmp_path, "--max_steps", "3")
    model = load_checkpoint(path, kinds=("autoencoder",))
    assert not {"optimizer", "sampler", "rng"} & model.keys()
    optimizer = load_checkpoint(tmp_path / "opt_seed=0_step=3.pt", kinds=("autoencoder_optimizer",))
    assert optimizer["step"] == 3 and optimizer["sampler"]["offset"] > 0 and optimizer["optimizer"]["state"]
    # the model file alone is a usable autoencoder; it is smaller than model + optimizer
    assert os.path.getsize(path) < os.path.getsize(path) + os.path.getsize(tmp_path / "opt_seed=0_step=3.pt")
    autoencoder, checkpoint = load_autoencoder(path)
    assert checkpoint.step == 3 and checkpoint.training_state is None and autoencoder.genes == model["genes"]


def legacy_layout(path, source):
    """Rewrite ``source`` (a new-layout model + its opt file) as one file in the layout before the split."""
    payload = load_checkpoint(source)
    state = AutoencoderCheckpoint.load(source, with_training_state=True).training_state
    payload.update(state)
    save_checkpoint({k: v for k, v in payload.items() if k not in ("format_version", "kind")}, path,
                    kind="autoencoder")
    return str(path)


def test_old_single_file_checkpoints_still_resume_exactly(workspace, tmp_path):
    straight = ae(workspace, tmp_path / "a", "--max_steps", "8", "--checkpoint_freq", "4", "--dropout", "0.2")
    os.makedirs(tmp_path / "old")
    old = legacy_layout(tmp_path / "old" / "model_seed=0_step=4.pt", str(tmp_path / "a" / "model_seed=0_step=4.pt"))
    resumed = ae(workspace, tmp_path / "b", "--max_steps", "8", "--checkpoint_freq", "4", "--dropout", "0.2",
                 "--resume_checkpoint", old)
    first, second = load_checkpoint(straight)["state_dict"], load_checkpoint(resumed)["state_dict"]
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.skipif(not (LEGACY / "autoencoder.pt").exists(), reason="legacy fixture not present")
def test_the_legacy_v1_autoencoder_loads_and_resumes(tmp_path):
    checkpoint = AutoencoderCheckpoint.load(str(LEGACY / "autoencoder.pt"), with_training_state=True)
    assert checkpoint.step == 5 and checkpoint.training_state["sampler"]["epoch"] == 1
    autoencoder, _ = load_autoencoder(str(LEGACY / "autoencoder.pt"))
    assert autoencoder.model.latent_dim == 4 and len(autoencoder.genes) == 12
    path = VAE_train.main(["--data_dir", str(LEGACY / "counts.h5ad"), "--save_dir", str(tmp_path),
                           "--state_dict", str(LEGACY / "autoencoder.pt"), "--max_steps", "7", "--batch_size", "16",
                           "--hidden_dims", "8", "8", "--latent_dim", "4", "--progress", "False"])
    assert load_checkpoint(path)["step"] == 7


def test_autoencoder_aliases_resume_checkpoint_and_save_interval(workspace, tmp_path):
    ae(workspace, tmp_path, "--max_steps", "4", "--save_interval", "2")
    assert (tmp_path / "model_seed=0_step=2.pt").exists()
    final = ae(workspace, tmp_path, "--max_steps", "6", "--save_interval", "2", "--resume_checkpoint", tmp_path)
    assert final.endswith("model_seed=0_step=6.pt")
    assert list(log_rows(tmp_path)["step"]) == [2, 4, 6]


# ---- the loop: deadline, start step, log ---------------------------------------------------------------------
def test_max_minutes_stops_and_saves(workspace, tmp_path, monkeypatch, capsys):
    clock = iter(range(0, 10_000, 20))  # every reading of the clock is 20 s later
    monkeypatch.setattr(training_loop.time, "monotonic", lambda: float(next(clock)))
    path = ae(workspace, tmp_path, "--max_steps", "1000", "--max_minutes", "1")
    step = load_checkpoint(path)["step"]
    assert step == 3 and path.endswith("_step=3.pt")  # the clock passed 60 s after the third step
    assert "--max_minutes 1.0 reached at step 3" in capsys.readouterr().out


def test_start_step_overrides_the_counter(workspace, tmp_path):
    ae(workspace, tmp_path, "--max_steps", "2", "--log_interval", "1")
    final = ae(workspace, tmp_path, "--max_steps", "10", "--log_interval", "1", "--state_dict", tmp_path,
               "--start_step", "7")
    assert final.endswith("model_seed=0_step=10.pt")
    assert list(log_rows(tmp_path)["step"]) == [1, 2, 8, 9, 10]  # rows after step 7 only: 3 steps were run


def test_resumed_run_does_not_repeat_log_rows(workspace, tmp_path):
    ae(workspace, tmp_path, "--max_steps", "6", "--checkpoint_freq", "3", "--log_interval", "1")
    os.remove(tmp_path / "model_seed=0_step=6.pt")  # as if killed after step 6 was logged, before it was saved
    ae(workspace, tmp_path, "--max_steps", "6", "--checkpoint_freq", "3", "--log_interval", "1", "--state_dict",
       tmp_path)
    assert list(log_rows(tmp_path)["step"]) == [1, 2, 3, 4, 5, 6]


def test_validation_loss_is_logged_periodically(workspace, tmp_path):
    ae(workspace, tmp_path, "--max_steps", "6", "--log_interval", "2", "--checkpoint_freq", "100")
    rows = log_rows(tmp_path)
    assert list(rows["step"]) == [2, 4, 6] and np.isfinite(rows["val_loss"]).all()


def test_diffusion_logs_truncate_on_resume(workspace, tmp_path):
    diffusion(workspace, tmp_path, "--lr_anneal_steps", "6", "--save_interval", "3", "--log_interval", "1")
    for name in ("model000006.pt", "opt000006.pt", "ema_0.9999_000006.pt"):
        os.remove(tmp_path / "run" / name)
    diffusion(workspace, tmp_path, "--lr_anneal_steps", "6", "--save_interval", "3", "--log_interval", "1",
              "--resume_checkpoint", tmp_path / "run")
    assert list(log_rows(tmp_path / "run")["step"]) == [1, 2, 3, 4, 5, 6]


def test_microbatches_give_the_full_batch_result(workspace, tmp_path):
    runs = {}
    for microbatch in ("16", "5"):
        path = diffusion(workspace, tmp_path / microbatch, "--lr_anneal_steps", "5", "--log_interval", "1",
                         "--microbatch", microbatch)
        runs[microbatch] = (log_rows(tmp_path / microbatch / "run")["loss"], load_checkpoint(path)["state_dict"])
    np.testing.assert_allclose(runs["5"][0], runs["16"][0], rtol=1e-5)
    for name, value in runs["16"][1].items():
        np.testing.assert_allclose(runs["5"][1][name], value, rtol=1e-4, atol=1e-6, err_msg=name)


# ---- divergence ------------------------------------------------------------------------------------------------
def test_diverging_autoencoder_stops_and_keeps_its_last_good_checkpoint(workspace, tmp_path, capsys):
    good = ae(workspace, tmp_path, "--max_steps", "2")
    line = refused(capsys, lambda: ae(workspace, tmp_path, "--max_steps", "40", "--checkpoint_freq", "4",
                                      "--lr", "1e8", "--state_dict", good), "training diverged at step")
    assert f"the last good checkpoint {good} (step 2) is kept; lower --lr (it is 1e+08)" in line
    assert sorted(p.name for p in tmp_path.glob("model_*.pt")) == ["model_seed=0_step=2.pt"]
    refused(capsys, lambda: ae(workspace, tmp_path / "fresh", "--max_steps", "40", "--lr", "1e8"),
            "no checkpoint was saved; lower --lr (it is 1e+08) and start again")
    assert not list((tmp_path / "fresh").glob("*.pt"))


def test_diverging_diffusion_run_stops_with_one_line(workspace, tmp_path, capsys):
    refused(capsys, lambda: diffusion(workspace, tmp_path, "--lr_anneal_steps", "40", "--save_interval", "5",
                                      "--lr", "1e8"), "training diverged at step")
    assert not list((tmp_path / "run").glob("model*.pt"))


# ---- resume refuses what would change the model or its record ----------------------------------------------------
@pytest.fixture(scope="module")
def first_half(workspace):
    folder = workspace["root"] / "diffusion_half"
    diffusion(workspace, folder, "--lr_anneal_steps", "2", "--label_key", "cell_type1")
    return str(folder / "run" / "model000002.pt")


def resume_differently(workspace, tmp_path, first_half, *extra, data=None, vae=None):
    shutil.copytree(Path(first_half).parent, tmp_path / "run")
    return lambda: diffusion(workspace, tmp_path, "--lr_anneal_steps", "4", "--resume_checkpoint",
                             tmp_path / "run", *extra, data=data, vae=vae)


def test_resume_refuses_another_latent_scale(workspace, tmp_path, first_half, capsys):
    line = refused(capsys, resume_differently(workspace, tmp_path, first_half, "--label_key", "cell_type1",
                                              "--latent_scale", "1"), "records latent scale ")
    assert "this run (--latent_scale) gives 1.0" in line


def test_resume_refuses_other_labels_and_batch_size(workspace, tmp_path, first_half, capsys):
    refused(capsys, resume_differently(workspace, tmp_path / "k", first_half, "--label_key", "donor"),
            "has model config")  # 2 donors, 3 cell types: another network
    adata = anndata.read_h5ad(workspace["data"])
    adata.obs["cell_type1"] = adata.obs["cell_type1"].cat.rename_categories(["alpha", "beta", "gamma"])
    data = str(tmp_path / "relabelled.h5ad")
    adata.write_h5ad(data)
    refused(capsys, resume_differently(workspace, tmp_path / "a", first_half, "--label_key", "cell_type1", data=data),
            "records vocabularies other values, this run (--data_dir) gives other values")
    line = refused(capsys, resume_differently(workspace, tmp_path / "b", first_half, "--label_key", "cell_type1",
                                              "--batch_size", "8"), "was trained with --batch_size 16")
    assert "this run has --batch_size 8" in line


def test_resume_refuses_other_cells_with_the_same_genes_and_labels(workspace, tmp_path, first_half, capsys):
    adata = anndata.read_h5ad(workspace["data"])
    adata.X = adata.X * 3  # the same cells, three times the counts: other library sizes
    data = str(tmp_path / "other.h5ad")
    adata.write_h5ad(data)
    refused(capsys, resume_differently(workspace, tmp_path, first_half, "--label_key", "cell_type1", data=data),
            "was trained on other data than --data_dir")  # issue 25: the fingerprint names what differs


def test_resume_refuses_other_genes(workspace, tmp_path, first_half, capsys):
    adata = anndata.read_h5ad(workspace["data"])
    adata.var_names = [f"other{j}" for j in range(adata.n_vars)]
    data = str(tmp_path / "genes.h5ad")
    adata.write_h5ad(data)
    vae = ae(workspace, tmp_path / "ae", "--max_steps", "2", data=data)
    refused(capsys, resume_differently(workspace, tmp_path, first_half, "--label_key", "cell_type1", data=data,
                                       vae=vae), "records genes other values")


def test_autoencoder_resume_refuses_another_model_or_batch_size(workspace, tmp_path, capsys):
    ae(workspace, tmp_path, "--max_steps", "2")
    refused(capsys, lambda: ae(workspace, tmp_path, "--max_steps", "4", "--state_dict", tmp_path, "--latent_dim", "4"),
            "was trained with {'num_genes': 24, 'latent_dim': 8")
    refused(capsys, lambda: ae(workspace, tmp_path, "--max_steps", "4", "--state_dict", tmp_path,
                               "--batch_size", "8"), "was trained with --batch_size 16, this run has --batch_size 8")


# ---- occupied output folders ---------------------------------------------------------------------------------------
def test_a_folder_in_use_by_another_run_is_refused(workspace, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    holder = os.open(tmp_path / "run", os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running trainer holds
    try:
        refused(capsys, lambda: diffusion(workspace, tmp_path, "--lr_anneal_steps", "2"),
                f"--save_dir {tmp_path / 'run'} is in use by another training run")
        os.makedirs(tmp_path / "ae")
        holder_ae = os.open(tmp_path / "ae", os.O_RDONLY)
        fcntl.flock(holder_ae, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused(capsys, lambda: ae(workspace, tmp_path / "ae", "--max_steps", "2"), "is in use by another training run")
        os.close(holder_ae)
    finally:
        os.close(holder)
    assert diffusion(workspace, tmp_path, "--lr_anneal_steps", "2").endswith("model000002.pt")  # released: free


def test_a_fresh_run_into_a_folder_with_checkpoints_needs_overwrite(workspace, tmp_path, capsys):
    ae(workspace, tmp_path, "--max_steps", "3")
    refused(capsys, lambda: ae(workspace, tmp_path, "--max_steps", "2"),
            f"--save_dir {tmp_path} already holds checkpoints (opt_seed=0_step=3.pt, 2 files); resume with "
            f"--state_dict, choose another folder, or pass --overwrite True")
    ae(workspace, tmp_path, "--max_steps", "2", "--overwrite", "True")
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["model_seed=0_step=2.pt", "opt_seed=0_step=2.pt"]
    diffusion(workspace, tmp_path / "d", "--lr_anneal_steps", "2")
    refused(capsys, lambda: diffusion(workspace, tmp_path / "d", "--lr_anneal_steps", "2"),
            "already holds checkpoints (opt000002.pt, 3 files); resume with --resume_checkpoint")


# ---- flags ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["ae", "diffusion"])
def test_negative_seed_is_one_line(workspace, tmp_path, capsys, script):
    run = (lambda: ae(workspace, tmp_path, "--seed", "-1")) if script == "ae" else \
        (lambda: diffusion(workspace, tmp_path, "--seed", "-1"))
    refused(capsys, run, "argument --seed: must be zero or positive, got -1")


def test_autoencoder_batch_of_one_is_refused(workspace, tmp_path, capsys):
    refused(capsys, lambda: ae(workspace, tmp_path, "--max_steps", "2", "--batch_size", "1"),
            "--batch_size 1 is too small: the autoencoder's BatchNorm layers need at least 2 cells per batch")


def option_help(text, flag):
    """The help text of ``flag`` in ``--help`` output (its option line and the indented lines after it)."""
    block = text.split(f"\n  {flag} ", 1)[1]
    return " ".join(block.split("\n  -", 1)[0].split())


@pytest.mark.parametrize("parser, steps", [(VAE_train.build_parser, "--max_steps"),
                                           (cell_train.build_parser, "--lr_anneal_steps")])
def test_help_shows_defaults_and_explains_the_main_flags(parser, steps):
    text = parser().format_help()
    for flag, default in ((steps, "(default: 200000)" if steps == "--max_steps" else "(default: 800000)"),
                          ("--seed", "(default: 0)"), ("--lr", "(default: "), ("--threads", "(default: None)")):
        described = option_help(text, flag)
        assert default in described and len(described) > len(default) + 20, (flag, described)


# ---- threads ---------------------------------------------------------------------------------------------------------
def test_available_cores_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert threads_module.available_cores(str(quota)) == 4
    quota.write_text("150000 100000\n")  # 1.5 cores: rounded up
    assert threads_module.available_cores(str(quota)) == 2
    assert threads_module.available_cores(str(tmp_path / "missing")) == 4


def test_threads_flag_sets_torch_threads(workspace, tmp_path, monkeypatch):
    monkeypatch.setitem(threads_module._explicit, "threads", None)
    ae(workspace, tmp_path, "--max_steps", "1", "--threads", "2")
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setitem(threads_module._explicit, "threads", None)
    assert threads_module.apply_threads(None) == 1 and torch.get_num_threads() == 1


def test_threads_also_hold_the_blas_pools_the_evaluation_computes_in(monkeypatch):
    """--threads reaches numpy's and scipy's BLAS (the evaluation's PCA): the same scores whatever the
    environment's OPENBLAS/OMP settings."""
    from threadpoolctl import threadpool_info, threadpool_limits

    monkeypatch.setitem(threads_module._explicit, "threads", None)
    with threadpool_limits(limits=1):  # restores the session's limits afterwards
        threads_module.apply_threads(3)
        pools = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert pools and {pool["num_threads"] for pool in pools} == {3}
        assert any("scipy" in pool["filepath"] for pool in pools) or len(pools) == 1
        threads_module.apply_threads(1)
        assert {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"} == {1}


def test_library_errors_name_parameters_and_the_cli_words_them_as_flags(workspace, tmp_path, capsys):
    from guided_diffusion.training.config import AutoencoderModelConfig, AutoencoderTrainingConfig, DataConfig
    from guided_diffusion.core.errors import SettingError
    from VAE.autoencoder_training import train_autoencoder

    with pytest.raises(SettingError, match=r"^num_genes 99 contradicts the data, which has 24 genes; omit num_genes"):
        train_autoencoder(DataConfig(workspace["data"]), AutoencoderModelConfig(num_genes=99),
                          AutoencoderTrainingConfig(save_dir=str(tmp_path), progress=False))
    refused(capsys, lambda: ae(workspace, tmp_path, "--num_genes", "99"),
            "--num_genes 99 contradicts the data, which has 24 genes; omit --num_genes or fix it")


def test_deterministic_runs_on_one_thread_with_deterministic_algorithms(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(threads_module._explicit, "threads", None)
    try:
        ae(workspace, tmp_path, "--max_steps", "1", "--deterministic", "True")
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    refused(capsys, lambda: ae(workspace, tmp_path / "b", "--deterministic", "True", "--threads", "2"),
            "--deterministic True runs on one thread; drop --threads 2 or set it to 1")
