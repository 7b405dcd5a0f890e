"""Latents on disk: the store's reads, the trainer on it against the in-memory one, reuse and re-encoding,
and two processes writing one file."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cell_train
from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.training.latent_store import LATENTS_FILE, SIDECAR_FILE, LatentStore
from synthetic import REPO_ROOT, make_counts_adata
from VAE import VAE_train
from VAE.VAE_model import Autoencoder

AE_FLAGS = ["--max_steps", "4", "--checkpoint_freq", "4", "--batch_size", "30", "--hidden_dims", "16", "16",
            "--latent_dim", "8", "--progress", "False", "--device", "cpu", "--precision", "fp32"]
DIFFUSION_FLAGS = ["--lr_anneal_steps", "8", "--save_interval", "4", "--log_interval", "4", "--batch_size", "30",
                   "--hidden_dims", "16", "16", "--label_key", "cell_type1", "--progress", "False",
                   "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_store")
    data, other = root / "counts.h5ad", root / "other.h5ad"
    make_counts_adata(n_cells=120, n_genes=30, seed=3).write_h5ad(data)
    make_counts_adata(n_cells=120, n_genes=30, seed=4).write_h5ad(other)
    vae = VAE_train.main(["--data_dir", str(data), "--save_dir", str(root / "ae"), *AE_FLAGS])
    vae2 = VAE_train.main(["--data_dir", str(data), "--save_dir", str(root / "ae2"), *AE_FLAGS, "--seed", "1"])
    return {"root": root, "data": str(data), "other": str(other), "vae": vae, "vae2": vae2}


def train(inputs, name, *extra, data=None, vae=None):
    return cell_train.main(["--data_dir", data or inputs["data"], "--vae_path", vae or inputs["vae"],
                            "--save_dir", str(inputs["root"] / "diffusion"), "--model_name", name,
                            *DIFFUSION_FLAGS, *extra])


@pytest.fixture
def encoder_calls(monkeypatch):
    calls = []
    original = Autoencoder.encode_dataset

    def counted(self, dataset, *args, **kwargs):
        calls.append(dataset.n_cells)
        return original(self, dataset, *args, **kwargs)

    monkeypatch.setattr(Autoencoder, "encode_dataset", counted)
    return calls


def test_the_store_reads_rows_exactly(tmp_path):
    latents = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    store = LatentStore(str(tmp_path / "latents.npy"))
    index = np.random.default_rng(1).integers(0, 1000, size=300)
    assert store.shape == (1000, 7) and len(store) == 1000 and store.size == 7000
    np.testing.assert_array_equal(store.rows(index), latents[index])
    np.testing.assert_array_equal(store[10:517], latents[10:517])
    np.testing.assert_array_equal(store.subsample(100), latents[::10])
    store.scale = 2.5
    scaled = latents.copy()
    np.multiply(scaled, 2.5, out=scaled)
    np.testing.assert_array_equal(store.rows(index), scaled[index])
    np.testing.assert_array_equal(store[0:1000], scaled)
    store.close()


def test_the_trainer_on_disk_gives_the_weights_of_the_one_in_memory(inputs):
    memory = train(inputs, "memory", "--latents_on_disk", "False")
    disk = train(inputs, "disk", "--latents_on_disk", "True")
    assert not os.path.exists(Path(memory).parent / LATENTS_FILE)
    assert os.path.exists(Path(disk).parent / LATENTS_FILE) and os.path.exists(Path(disk).parent / SIDECAR_FILE)
    one, two = load_checkpoint(memory), load_checkpoint(disk)
    for key, value in one["state_dict"].items():
        assert torch.equal(two["state_dict"][key], value), key
    assert two["latent_scale"] == one["latent_scale"] and two["latent_range"] == one["latent_range"]


def test_a_streamed_run_keeps_its_latents_on_disk_by_default(inputs):
    folder = Path(train(inputs, "streamed", "--backed", "True")).parent
    assert (folder / LATENTS_FILE).exists()


def test_resume_reuses_the_latents_and_other_inputs_encode_again(inputs, encoder_calls, capsys):
    full = train(inputs, "full", "--latents_on_disk", "True")
    folder = Path(full).parent
    encoder_calls.clear()
    resumed = train(inputs, "full", "--latents_on_disk", "True", "--resume_checkpoint", str(folder / "model000004.pt"))
    assert encoder_calls == [] and "reusing the latents" in capsys.readouterr().out
    assert all(torch.equal(load_checkpoint(resumed)["state_dict"][k], v)
               for k, v in load_checkpoint(full)["state_dict"].items())
    train(inputs, "full", "--latents_on_disk", "True", "--overwrite", "True", vae=inputs["vae2"])
    out = capsys.readouterr().out
    assert encoder_calls and "encoding the latents again" in out and "vae sha256" in out
    encoder_calls.clear()
    train(inputs, "full", "--latents_on_disk", "True", "--overwrite", "True", data=inputs["other"],
          vae=inputs["vae2"])
    out = capsys.readouterr().out
    assert encoder_calls and "encoding the latents again" in out and "data fingerprint" in out


def test_two_processes_write_one_store_and_train_as_one(inputs):
    single = Path(train(inputs, "single_disk", "--latents_on_disk", "True")).parent
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed")
    command = [str(torchrun), "--nproc_per_node", "2", "cell_train.py", "--data_dir", inputs["data"],
               "--vae_path", inputs["vae"], "--save_dir", str(inputs["root"] / "diffusion"), "--model_name", "two",
               *DIFFUSION_FLAGS, "--latents_on_disk", "True"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = inputs["root"] / "diffusion" / "two"
    np.testing.assert_allclose(np.load(folder / LATENTS_FILE), np.load(single / LATENTS_FILE), atol=1e-6)
    for name in ("model000008.pt", "ema_0.9999_000008.pt"):
        one, two = load_checkpoint(single / name)["state_dict"], load_checkpoint(folder / name)["state_dict"]
        for key in one:
            np.testing.assert_allclose(two[key], one[key], atol=1e-5, rtol=1e-4, err_msg=f"{name} {key}")
