"""Two CPU processes (torchrun and mpiexec) give the results of one process with the same global batch.

References are trained in this process; the launches run the real scripts as subprocesses. The
pre-BatchNorm Linear biases of the autoencoder are compared loosely: BatchNorm removes any per-feature
shift, so their true gradient is zero and AdamW turns the rounding noise of the (differently ordered)
reductions into steps of up to ``lr``; they change nothing in the training-mode output, which is
compared tightly instead.
"""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch
import torch.distributed as dist

import cell_sample
import cell_train
from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.core.errors import UsageError
from guided_diffusion.cli import _exit_status
from guided_diffusion.data import load_dataset
from guided_diffusion.core.distributed import (CrossRankBatchNorm1d, DistributedContext,
                                               convert_to_cross_rank_batchnorm, end_process, setup_distributed)
from synthetic import REPO_ROOT, make_counts_adata
from VAE import VAE_train
from VAE.autoencoder_checkpoint import AutoencoderCheckpoint
from VAE.VAE_model import VAE

BIN = Path(sys.executable).parent
LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "2"],
    "mpiexec": [str(BIN / "mpiexec"), "-n", "2", sys.executable],
}
AE_STEPS, AE_LR = 10, 1e-3
AE_FLAGS = ["--max_steps", str(AE_STEPS), "--checkpoint_freq", str(AE_STEPS), "--batch_size", "30",
            "--hidden_dims", "32", "32", "32", "--latent_dim", "8", "--lr", str(AE_LR), "--val_fraction", "0.1",
            "--progress", "False", "--device", "cpu", "--precision", "fp32"]
DIFFUSION_FLAGS = ["--lr_anneal_steps", "12", "--save_interval", "6", "--log_interval", "3", "--batch_size", "30",
                   "--microbatch", "7", "--hidden_dims", "32", "32", "16", "--label_key", "cell_type1",
                   "--label_key", "donor", "--p_uncond", "0.3", "--progress", "False", "--device", "cpu",
                   "--precision", "fp32"]
SAMPLE_FLAGS = ["--num_samples", "5", "--batch_size", "4", "--timestep_respacing", "20", "--progress", "False",
                "--device", "cpu"]


def launcher_available(name):
    if not Path(LAUNCHERS[name][0]).exists():
        return False
    if name == "mpiexec":
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            return False
    return True


def run_launched(launcher, script, argv):
    """Run ``script`` (relative to the repository) under ``launcher`` with 2 processes; its CompletedProcess."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [*LAUNCHERS[launcher], str(script), *map(str, argv)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    result.description = f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def launch(launcher, script, argv):
    """Run ``script`` under ``launcher`` with 2 processes; fail with its output unless it succeeds."""
    result = run_launched(launcher, script, argv)
    assert result.returncode == 0, result.description
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs of the three scripts on tiny data; the launches reuse their inputs."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "counts.h5ad"
    make_counts_adata(n_cells=200, n_genes=40, seed=2).write_h5ad(data)
    vae = VAE_train.main(["--data_dir", str(data), "--save_dir", str(root / "ae_one"), *AE_FLAGS])
    model = cell_train.main(["--data_dir", str(data), "--vae_path", vae, "--save_dir", str(root / "diffusion"),
                             "--model_name", "one", *DIFFUSION_FLAGS])
    samples = cell_sample.main(["--model_path", model, "--sample_dir", str(root / "samples_one"), *SAMPLE_FLAGS])
    return {"root": root, "data": str(data), "vae": vae, "model": model, "samples": samples, "launched": {}}


def launched(reference, launcher, what):
    """Output of ``what`` (autoencoder, diffusion, sampling) run by ``launcher``, launched once per module;
    a launch that failed fails every test that uses it with its own message (not with a second launch's)."""
    if not launcher_available(launcher):
        pytest.skip(f"{launcher} is not installed next to {sys.executable}")
    key = (launcher, what)
    if key not in reference["launched"]:
        try:
            reference["launched"][key] = _launch_once(reference, launcher, what)
        except AssertionError as failure:
            reference["launched"][key] = failure
    if isinstance(reference["launched"][key], AssertionError):
        pytest.fail(f"the {launcher} {what} launch failed:\n{reference['launched'][key]}")
    return reference["launched"][key]


def _launch_once(reference, launcher, what):
    root, data = reference["root"], reference["data"]
    if what == "autoencoder":
        launch(launcher, "VAE/VAE_train.py", ["--data_dir", data, "--save_dir", root / f"ae_{launcher}", *AE_FLAGS])
        return root / f"ae_{launcher}" / f"model_seed=0_step={AE_STEPS}.pt"
    if what == "diffusion":
        launch(launcher, "cell_train.py", ["--data_dir", data, "--vae_path", reference["vae"],
                                           "--save_dir", root / "diffusion", "--model_name", launcher,
                                           *DIFFUSION_FLAGS])
        return root / "diffusion" / launcher
    launch(launcher, "cell_sample.py", ["--model_path", reference["model"],
                                        "--sample_dir", root / f"samples_{launcher}", *SAMPLE_FLAGS])
    return root / f"samples_{launcher}"


def zero_gradient_entries(model):
    """Names of Linear biases directly followed by BatchNorm, and of those BatchNorms' running means."""
    names = []
    for prefix in ("encoder", "decoder"):
        layers = getattr(model, prefix)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], torch.nn.Linear) and isinstance(layers[i + 1], torch.nn.BatchNorm1d):
                names += [f"{prefix}.{i}.bias", f"{prefix}.{i + 1}.running_mean"]
    return names


def training_mode_reconstruction(payload, batch, labels):
    model = VAE(**VAE.complete_config(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    model.train()
    with torch.no_grad():
        return model(batch, labels=labels)[0]


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_autoencoder_two_processes_equal_one(reference, launcher):
    path = launched(reference, launcher, "autoencoder")
    one, two = load_checkpoint(reference["vae"]), load_checkpoint(path)
    states = [AutoencoderCheckpoint.load(str(p), with_training_state=True).training_state for p in (reference["vae"], path)]
    assert two["step"] == AE_STEPS and states[1]["sampler"] == states[0]["sampler"]
    loose = set(zero_gradient_entries(VAE(**one["model_config"])))
    for name, value in one["state_dict"].items():
        if name == "log_theta":  # refitted after training (rank 0): compare the trained one and the fit's likelihood
            np.testing.assert_allclose(two["dispersion_fit"]["learned_log_theta"],
                                       one["dispersion_fit"]["learned_log_theta"], atol=1e-5, rtol=1e-4)
            # where the likelihood is flat (these Poisson counts: theta -> infinity) the fitted values may differ
            assert two["dispersion_fit"]["nll_after"] == pytest.approx(one["dispersion_fit"]["nll_after"], rel=1e-4)
            continue
        tolerance = AE_LR * AE_STEPS if name in loose else 1e-5
        np.testing.assert_allclose(two["state_dict"][name].double(), value.double(), atol=tolerance, rtol=1e-4,
                                   err_msg=name)
    dataset = load_dataset(reference["data"], label_keys=["cell_type1"])  # the decoder reads it (the default)
    assert one["model_config"]["decoder_label_keys"] == ["cell_type1"]
    batch, labels = torch.from_numpy(dataset.rows(np.arange(64))), torch.from_numpy(dataset.label_codes[:64, 0])
    np.testing.assert_allclose(training_mode_reconstruction(two, batch, labels),
                               training_mode_reconstruction(one, batch, labels), atol=1e-4, rtol=1e-4)
    logs = [np.genfromtxt(Path(p).parent / "train_log.csv", delimiter=",", names=True)
            for p in (reference["vae"], path)]
    np.testing.assert_allclose(logs[1]["train_loss"], logs[0]["train_loss"], rtol=1e-5)


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_diffusion_two_processes_equal_one(reference, launcher):
    folder = launched(reference, launcher, "diffusion")
    single = Path(reference["model"]).parent
    assert sorted(os.listdir(folder)) == sorted(os.listdir(single))
    for name in ("model000012.pt", "ema_0.9999_000012.pt", "model000006.pt"):
        one, two = load_checkpoint(single / name)["state_dict"], load_checkpoint(folder / name)["state_dict"]
        for key in one:
            np.testing.assert_allclose(two[key], one[key], atol=1e-5, rtol=1e-4, err_msg=f"{name} {key}")
    logs = [np.genfromtxt(f / "train_log.csv", delimiter=",", names=True) for f in (single, folder)]
    np.testing.assert_allclose(logs[1]["loss"], logs[0]["loss"], rtol=1e-5)


def test_two_process_checkpoint_resumes_in_one_process(reference):
    folder = launched(reference, "torchrun", "diffusion")
    resumed = cell_train.main(["--data_dir", reference["data"], "--vae_path", reference["vae"],
                               "--save_dir", str(reference["root"] / "diffusion"), "--model_name", "resumed",
                               *DIFFUSION_FLAGS, "--resume_checkpoint", str(folder / "model000006.pt")])
    one = load_checkpoint(reference["model"])["state_dict"]
    again = load_checkpoint(resumed)["state_dict"]
    for key in one:
        np.testing.assert_allclose(again[key], one[key], atol=1e-5, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_sampling_two_processes_equal_one(reference, launcher):
    folder = launched(reference, launcher, "sampling")
    single = Path(reference["samples"]).parent
    assert sorted(os.listdir(folder)) == sorted(os.listdir(single))
    one, two = anndata.read_h5ad(reference["samples"]), anndata.read_h5ad(folder / "generated.h5ad")
    np.testing.assert_array_equal(two.X.toarray(), one.X.toarray())
    np.testing.assert_array_equal(two.layers["counts"].toarray(), one.layers["counts"].toarray())
    assert two.obs.equals(one.obs) and two.uns["cfdiffusion"]["n_cells"] == 30
    for name in os.listdir(single):
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(folder / name), np.load(single / name), atol=1e-5)


# ---- the end of a launched process -----------------------------------------------------------------
# Each rank wraps a model in DistributedDataParallel (after which destroy_process_group no longer frees the
# gloo group, so its worker threads outlive it), starts collectives on tensors Python drops at once (a worker
# thread then needs the GIL to release them) and keeps the GIL itself (switch interval of 1000 s), so the
# releases are still pending when the script returns. Ending through interpreter finalization, the ranks
# aborted ("terminate called without an active exception", exit -6) in 4 of 4 mpiexec and 5 of 6 torchrun
# runs before distributed.end_process.
PENDING_RELEASES_AT_EXIT = """
import atexit
import sys

import torch
import torch.distributed as dist

from guided_diffusion.cli import UsageError, command
from guided_diffusion.core.distributed import setup_distributed


@command
def main(argv=None):
    context = setup_distributed("cpu")
    atexit.register(print, f"atexit handlers ran on rank {context.rank}", flush=True)
    context.wrap(torch.nn.Linear(3, 3))
    sys.setswitchinterval(1000.0)
    for _ in range(20):
        dist.all_reduce(torch.ones(1), async_op=True)
    if sys.argv[1] == "fail":
        raise UsageError("--flag is wrong")
    if sys.argv[1] == "crash":  # run with --debug: the exception is raised, not turned into one line
        raise RuntimeError("a bug")
    print(f"finished on rank {context.rank}", flush=True)


if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("outcome", ["finish", "fail", "crash"])
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_launched_scripts_end_with_their_own_exit_status(tmp_path, launcher, outcome):
    if not launcher_available(launcher):
        pytest.skip(f"{launcher} is not installed next to {sys.executable}")
    script = tmp_path / "pending_releases_at_exit.py"
    script.write_text(PENDING_RELEASES_AT_EXIT)
    result = run_launched(launcher, script, [outcome, "--debug"] if outcome == "crash" else [outcome])
    output = result.stdout + result.stderr
    assert "terminate called" not in output and "exitcode: -6" not in output, result.description
    ranks_at_exit = [rank for rank in (0, 1) if f"atexit handlers ran on rank {rank}" in result.stdout]
    if outcome == "finish":
        assert result.returncode == 0 and ranks_at_exit == [0, 1], result.description
        assert all(f"finished on rank {rank}" in result.stdout for rank in (0, 1)), result.description
        return
    # the launcher may stop the other rank once one has failed
    message, status = ("error: --flag is wrong", 2) if outcome == "fail" else ("RuntimeError: a bug", 1)
    assert ranks_at_exit and message in result.stderr, result.description
    if outcome == "crash":  # the traceback Python prints, with the raising line
        assert 'raise RuntimeError("a bug")' in result.stderr, result.description
    else:  # one line, no traceback of the script
        assert "UsageError" not in result.stderr, result.description
    if launcher == "mpiexec":
        assert result.returncode == status, result.description
    else:  # torchrun exits 1 and logs each failed worker's own status
        assert result.returncode == 1 and f"(exitcode: {status})" in result.stderr, result.description


def test_exit_status_of_system_exit(capsys):
    assert [_exit_status(code) for code in (None, 0, 2, 143)] == [0, 0, 2, 143]
    assert _exit_status("stopped: reason") == 1 and capsys.readouterr().err == "stopped: reason\n"


def test_a_process_without_a_group_is_not_ended(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    setup_distributed("cpu")
    assert end_process(0) is None  # returned: a single process leaves through the interpreter as before


# ---- pieces, in this process ------------------------------------------------------------------------
def test_without_launcher_there_is_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = setup_distributed("cpu")
    assert (context.world_size, context.rank, context.is_main, context.backend) == (1, 0, True, None)
    assert not dist.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert context.wrap(model) is model and context.synchronize_batchnorm(model) is model


def test_shards_cover_the_batch_and_small_batches_are_refused():
    for n_items in (7, 8, 1):
        parts = [DistributedContext(rank=r, world_size=3).shard(n_items) for r in range(3)]
        assert [i for part in parts for i in range(n_items)[part]] == list(range(n_items))
    with pytest.raises(UsageError, match="--batch_size 1 is the global batch"):
        DistributedContext(rank=0, world_size=2).check_batch_size(1)


def test_cross_rank_batchnorm_equals_batchnorm_in_a_world_of_one():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4, momentum=0.3))
        converted = convert_to_cross_rank_batchnorm(copy.deepcopy(plain))
        assert isinstance(converted[1], CrossRankBatchNorm1d)
        assert set(converted.state_dict()) == set(plain.state_dict())
        x, target = torch.randn(9, 5) * 3 + 1, torch.randn(9, 4)
        outputs = []
        for model in (plain, converted):
            y = model(x)
            (y - target).pow(2).sum().backward()
            outputs.append((y.detach(), model[0].weight.grad.clone(), model[1].weight.grad.clone()))
        for got, expected in zip(outputs[1], outputs[0]):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for name, value in plain.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[name], value, atol=1e-6, rtol=1e-5)
        converted.eval()
        plain.eval()
        torch.testing.assert_close(converted(x), plain(x))
    finally:
        dist.destroy_process_group()
