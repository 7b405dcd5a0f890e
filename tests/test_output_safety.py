"""Issue 25 (Reliability III): a full disk, a kill or a second run never costs the earlier outputs.

* The sampler writes a whole new set (generated.h5ad, latents, manifest.json) under temporary names and
  swaps it in only when it is complete: a full disk, SIGTERM or SIGKILL during a rerun leaves the
  earlier set as it was; SIGTERM and write errors leave no temporaries.
* A full disk is one line (``error: No space left on device: PATH needs about …``), exit 1, in every tool:
  never a traceback, never a crash (h5py's errors at close/dealloc included).
* A trainer's model and optimizer files form one set: never one without the other.
* The sampler locks its --sample_dir: a second run is refused naming the running one, and no run
  deletes another's files.

A real full disk is a 1 MB tmpfs mounted in a user namespace (``unshare``; skipped where that is not
allowed); the always-run variants fail writes part-way with ``RLIMIT_FSIZE`` (EFBIG from inside h5py)
or a stream that raises ENOSPC once torch.save has written some bytes.
"""
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import cell_train
from guided_diffusion.core import container as checkpoint_module
from synthetic import REPO_ROOT, make_counts_adata
from VAE import VAE_train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(REPO_ROOT)}
TINY_AE = ["--hidden_dims", "16", "16", "16", "--latent_dim", "8", "--batch_size", "16", "--progress", "False"]
TINY_UNET = ["--hidden_dims", "16", "16", "8", "8", "--batch_size", "16", "--progress", "False"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Counts (200 genes), a tiny autoencoder and a tiny diffusion model (one label key)."""
    root = tmp_path_factory.mktemp("output_safety")
    data = root / "counts.h5ad"
    make_counts_adata(n_cells=120, n_genes=200, seed=1).write_h5ad(data)
    vae = VAE_train.main(["--data_dir", str(data), "--save_dir", str(root / "ae"), "--max_steps", "4", *TINY_AE])
    model = cell_train.main(["--data_dir", str(data), "--vae_path", vae, "--save_dir", str(root / "diffusion"),
                             "--model_name", "tiny", "--label_key", "cell_type1", "--lr_anneal_steps", "2",
                             "--save_interval", "2", *TINY_UNET])
    return {"root": root, "data": str(data), "vae": vae, "model": model}


def sample_argv(workspace, sample_dir, num_samples=20):
    return ["cell_sample.py", "--model_path", workspace["model"], "--sample_dir", str(sample_dir),
            "--num_samples", str(num_samples), "--timestep_respacing", "ddim4", "--use_ddim", "True",
            "--observation", "mean", "--progress", "False"]


def run(argv, **kwargs):
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=180, **kwargs)


def snapshot(folder):
    """{name: sha256} of every file in ``folder`` (hidden ones included)."""
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as stream:
                found[os.path.relpath(path, folder)] = hashlib.sha256(stream.read()).hexdigest()
    return found


def assert_one_line_error(result, code, *expected):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "Segmentation" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ---- a real full disk: a tiny tmpfs in a user namespace ------------------------------------------------
DRIVER = r"""
import hashlib, json, os, subprocess, sys
folder, steps = sys.argv[1], json.loads(sys.argv[2])
def snapshot():
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as stream:
                found[os.path.relpath(path, folder)] = hashlib.sha256(stream.read()).hexdigest()
    return found
results = []
for step in steps:
    if "fill_leaving" in step:
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        with open(os.path.join(folder, "filler"), "wb") as stream:
            stream.write(b"x" * max(free - step["fill_leaving"], 0))
        results.append({})
        continue
    done = subprocess.run([sys.executable, *step["run"]], capture_output=True, text=True, timeout=180)
    results.append({"returncode": done.returncode, "stderr": done.stderr, "files": snapshot()})
print(json.dumps(results))
"""


def _namespaces_work():
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt || mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


needs_small_disk = pytest.mark.skipif(not _namespaces_work(),
                                      reason="no user namespaces: cannot mount a tiny tmpfs as a full disk")


def on_small_disk(tmp_path, size, steps):
    """Run ``steps`` (``{"run": argv}`` or ``{"fill_leaving": bytes}``) with ``tmp_path/disk`` a tmpfs of ``size``."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size={size} tmpfs {disk} && exec {sys.executable} -c \"$DRIVER\" {disk} "
              f"'{json.dumps(steps)}'")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO_ROOT,
                          env={**ENV, "DRIVER": DRIVER}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return disk, [type("Result", (), step) for step in json.loads(done.stdout)]


@needs_small_disk
def test_sampler_on_a_full_disk_keeps_the_earlier_set(workspace, tmp_path):
    disk = tmp_path / "disk"
    out = disk / "out"
    disk, (first, second) = on_small_disk(tmp_path, "1m", [{"run": sample_argv(workspace, out, 100)},
                                                             {"run": sample_argv(workspace, out, 2000)}])
    assert first.returncode == 0, first.stderr
    assert_one_line_error(second, 1, f"No space left on device: {out}", "needs about")
    assert second.files == first.files, "the earlier complete set must be kept, byte for byte"
    assert not [name for name in second.files if name.startswith(".") or "/." in name]


@needs_small_disk
def test_autoencoder_on_a_full_disk_is_one_line_and_leaves_no_lone_file(workspace, tmp_path):
    save_dir = tmp_path / "disk" / "ae"
    _, (result,) = on_small_disk(tmp_path, "1m", [{"run": [
        "VAE/VAE_train.py", "--data_dir", workspace["data"], "--save_dir", str(save_dir), "--max_steps", "2",
        "--hidden_dims", "256", "256", "256", "--latent_dim", "8", "--batch_size", "16", "--progress", "False"]}])
    assert_one_line_error(result, 1, f"No space left on device: {save_dir}", "needs about")
    assert not [name for name in result.files if name.endswith(".pt") or ".tmp" in name], result.files


@needs_small_disk
def test_diffusion_trainer_on_a_full_disk_is_one_line_and_leaves_no_lone_file(workspace, tmp_path):
    save_dir = tmp_path / "disk" / "diffusion"
    _, (result,) = on_small_disk(tmp_path, "1m", [{"run": [
        "cell_train.py", "--data_dir", workspace["data"], "--vae_path", workspace["vae"], "--save_dir",
        str(save_dir), "--model_name", "big", "--label_key", "cell_type1", "--lr_anneal_steps", "2",
        "--hidden_dims", "128", "128", "64", "64", "--batch_size", "16", "--progress", "False"]}])
    assert_one_line_error(result, 1, f"No space left on device: {save_dir}", "needs about")
    assert not [name for name in result.files if name.endswith(".pt") or ".tmp" in name], result.files


@needs_small_disk
def test_split_and_evaluation_on_a_full_disk_are_one_line(workspace, tmp_path):
    disk = tmp_path / "disk"
    split = ["exp_script/split.py", "--data_dir", workspace["data"], "--label_key", "cell_type1",
             "--out", str(disk / "split")]
    evaluate = ["exp_script/evaluate.py", "--real", workspace["data"], "--generated", workspace["data"],
                "--label_key", "cell_type1", "--out", str(disk / "evaluation"), "--progress", "False",
                "--generated_input_is_log", "False",
                "--plots", "False"]
    _, (split_result, _, evaluate_result) = on_small_disk(
        tmp_path, "128k", [{"run": split}, {"fill_leaving": 0}, {"run": evaluate}])
    assert_one_line_error(split_result, 1, f"No space left on device: {disk / 'split'}", "needs")
    assert_one_line_error(evaluate_result, 1, f"No space left on device: {disk / 'evaluation'}", "needs")
    assert not [name for name in {**split_result.files, **evaluate_result.files} if ".tmp" in name]


# ---- a file-size limit: EFBIG from inside h5py, part-way through generated.h5ad -------------------------
def test_sampler_failing_mid_write_keeps_the_earlier_set(workspace, tmp_path):
    out = tmp_path / "out"
    assert run(sample_argv(workspace, out, 100)).returncode == 0
    before = snapshot(out)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))

    result = run(sample_argv(workspace, out, 2000), preexec_fn=limit_file_size)
    assert_one_line_error(result, 1, str(out))
    assert snapshot(out) == before, "the earlier complete set must be kept, byte for byte"


# ---- kills while decoding, and a second sampler into the same folder ------------------------------------
PAUSE_WHILE_DECODING = r"""
import os, sys, time
sys.argv = sys.argv[1:]
marker = os.environ["PAUSE_MARKER"]
import guided_diffusion.sampling.writer as writer
real_decode = writer._decode_mean
def paused_decode(*args, **kwargs):
    if not os.path.exists(marker + ".ready"):
        open(marker + ".ready", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(marker + ".go") and time.monotonic() < deadline:
            time.sleep(0.05)
    return real_decode(*args, **kwargs)
writer._decode_mean = paused_decode
import cell_sample
cell_sample.main()
"""


def start_paused(workspace, out, marker, num_samples=50):
    argv = sample_argv(workspace, out, num_samples)
    process = subprocess.Popen([sys.executable, "-c", PAUSE_WHILE_DECODING, *argv], cwd=REPO_ROOT,
                               env={**ENV, "PAUSE_MARKER": str(marker)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(f"{marker}.ready"):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the sampler never reached decoding"
        time.sleep(0.05)
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_rerun_killed_while_decoding_keeps_the_earlier_set(workspace, tmp_path, signum):
    out = tmp_path / "out"
    assert run(sample_argv(workspace, out)).returncode == 0
    before = snapshot(out)
    process = start_paused(workspace, out, tmp_path / "pause")
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    after = snapshot(out)
    assert {name: digest for name, digest in after.items() if not name.startswith(".")} == before
    if signum != signal.SIGKILL:
        assert after == before, f"temporaries left behind: {sorted(set(after) - set(before))}"
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    else:  # a killed run's temporaries are removed by the next run into the folder (it holds the lock)
        assert run(sample_argv(workspace, out)).returncode == 0
        assert not [name for name in snapshot(out) if name.startswith(".")]


def test_a_second_sampler_into_the_same_folder_is_refused_naming_the_first(workspace, tmp_path):
    out = tmp_path / "out"
    first = start_paused(workspace, out, tmp_path / "pause")
    try:
        second = run(sample_argv(workspace, out))
        line = assert_one_line_error(second, 2, f"--sample_dir {out} is in use by another cell_sample.py run",
                                     f"pid {first.pid}")
        assert "wait for it to finish or choose another folder" in line
    finally:
        (tmp_path / "pause.go").touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert {name: os.path.getsize(out / name) for name in manifest["files"]} == manifest["files"]
    assert not [name for name in os.listdir(out) if name.startswith(".")]


# ---- trainers: torch.save failing part-way (ENOSPC from the stream) ---------------------------------------
class FillingStream:
    """A stream that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, stream, room):
        self.stream, self.room = stream, room

    def write(self, data):
        if len(data) > self.room:
            self.stream.write(bytes(data)[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def fill_disk_when_saving(monkeypatch, kind):
    real_save = torch.save

    def save(payload, stream, *args, **kwargs):
        if isinstance(payload, dict) and payload.get("kind") == kind:
            stream = FillingStream(stream, 4096)
        return real_save(payload, stream, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)


def refused_in_process(capsys, main, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(item) for item in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device: "), err
    assert "needs about" in lines[0] and "unexpected" not in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", ["autoencoder", "autoencoder_optimizer"])
def test_autoencoder_disk_full_mid_save_leaves_neither_file(workspace, tmp_path, capsys, monkeypatch, kind):
    fill_disk_when_saving(monkeypatch, kind)
    line = refused_in_process(capsys, VAE_train.main, ["--data_dir", workspace["data"], "--save_dir", tmp_path,
                                                       "--max_steps", "2", *TINY_AE])
    assert str(tmp_path) in line
    assert [name for name in os.listdir(tmp_path) if name.endswith(".pt") or ".tmp" in name] == []


@pytest.mark.parametrize("kind", ["diffusion_model", "diffusion_optimizer", "diffusion_ema"])
def test_diffusion_disk_full_mid_save_leaves_no_partial_set(workspace, tmp_path, capsys, monkeypatch, kind):
    fill_disk_when_saving(monkeypatch, kind)
    line = refused_in_process(capsys, cell_train.main, [
        "--data_dir", workspace["data"], "--vae_path", workspace["vae"], "--save_dir", tmp_path,
        "--model_name", "run", "--label_key", "cell_type1", "--lr_anneal_steps", "2", *TINY_UNET])
    assert str(tmp_path / "run") in line
    assert [name for name in os.listdir(tmp_path / "run") if name.endswith(".pt") or ".tmp" in name] == []
