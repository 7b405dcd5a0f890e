"""Checkpoints written by main before the layered layout (tests/data/schema_v2) load, sample through the
default sampler, and resume training with today's code."""
import shutil
from pathlib import Path

import anndata
import pytest

import cell_sample
import cell_train
from guided_diffusion.checkpoints import SCHEMA_VERSION, DiffusionCheckpoint

DATA = Path(__file__).resolve().parent / "data"
V2 = DATA / "schema_v2"
COUNTS = DATA / "legacy_v1" / "counts.h5ad"
AUTOENCODER = "model_seed=0_step=5.pt"


@pytest.fixture()
def run_folder(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(V2, folder)
    return folder


def test_the_checkpoint_is_schema_2_and_loads(run_folder):
    checkpoint = DiffusionCheckpoint.load(str(run_folder / "model000004.pt"))
    assert SCHEMA_VERSION == 2 and checkpoint.diffusion["schedule"] == "linear"
    assert list(checkpoint.label_keys) == ["cell_type1", "donor"]


def test_it_samples_with_the_autoencoder_found_beside_it(run_folder, tmp_path):
    out = tmp_path / "samples"
    cell_sample.main(["--model_path", str(run_folder / "model000004.pt"), "--sample_dir", str(out),
                      "--num_samples", "4", "--progress", "False"])
    generated = anndata.read_h5ad(out / "generated.h5ad")
    assert generated.n_vars == 12 and generated.n_obs % 4 == 0 and generated.n_obs > 0
    record = generated.uns["cfdiffusion"]
    assert record["sampler"] == "dpmpp2m_sde" and record["checkpoint"] == "model000004.pt"
    assert set(generated.obs["cell_type1"].astype(str)) <= {"type_0", "type_1", "type_2"}


def test_training_resumes_from_it(run_folder, tmp_path, capsys):
    cell_train.main(["--data_dir", str(COUNTS), "--vae_path", str(run_folder / AUTOENCODER),
                     "--label_key", "cell_type1", "--label_key", "donor", "--model_name", "m",
                     "--save_dir", str(tmp_path), "--resume_checkpoint", str(run_folder / "model000004.pt"),
                     "--lr_anneal_steps", "6", "--save_interval", "6", "--hidden_dims", "8", "8", "8", "8",
                     "--batch_size", "16", "--progress", "False"])
    assert (run_folder / "model000006.pt").exists()
    assert DiffusionCheckpoint.load(str(run_folder / "model000006.pt")).step == 6
    assert "no fingerprint" in capsys.readouterr().err  # written before the data fingerprint: warned, resumed
