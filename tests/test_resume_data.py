"""Issue 25, finding 4: both trainers record a fingerprint of their training data (genes in order, cell
names, the matrix) and refuse to resume on other data, naming what differs, unless
``--resume_on_new_data True`` (then the change is recorded in the checkpoint). Checkpoints written
before the fingerprint still resume, with a one-line warning."""
import shutil
from pathlib import Path

import numpy as np
import pytest

import cell_train
from guided_diffusion.core.container import load_checkpoint, save_checkpoint
from guided_diffusion.data import load_dataset
from test_input_checks import one_line_error
from synthetic import make_counts_adata
from VAE import VAE_train

TINY_AE = ["--hidden_dims", "16", "16", "16", "--latent_dim", "8", "--batch_size", "16", "--progress", "False"]
TINY_UNET = ["--hidden_dims", "16", "16", "8", "8", "--batch_size", "16", "--progress", "False",
             "--precision", "fp32", "--label_key", "cell_type1"]
NEW_DATA = "--resume_on_new_data True"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The training data, its variants, an autoencoder checkpoint folder and a diffusion checkpoint folder."""
    root = tmp_path_factory.mktemp("resume_data")
    adata = make_counts_adata(n_cells=90, n_genes=24, seed=2)
    files = {"data": root / "counts.h5ad"}
    adata.write_h5ad(files["data"])
    other = make_counts_adata(n_cells=90, n_genes=24, seed=5)  # same genes and labels, other cells
    other.obs_names = [f"other{i}" for i in range(other.n_obs)]
    files["other_cells"] = root / "other_cells.h5ad"
    other.write_h5ad(files["other_cells"])
    files["reordered"] = root / "reordered.h5ad"
    adata[np.random.default_rng(0).permutation(adata.n_obs)].copy().write_h5ad(files["reordered"])
    swapped = adata.copy()
    dense = swapped.X.toarray()
    dense[:, [3, 4]] = dense[:, [4, 3]]  # two genes' columns swapped, the gene names left as they were
    swapped.X = type(adata.X)(dense)
    files["swapped"] = root / "swapped.h5ad"
    swapped.write_h5ad(files["swapped"])
    files = {name: str(path) for name, path in files.items()}
    ae_dir = root / "ae"
    vae = VAE_train.main(["--data_dir", files["data"], "--save_dir", str(ae_dir), "--max_steps", "2", *TINY_AE])
    diffusion_dir = root / "diffusion"
    cell_train.main(["--data_dir", files["data"], "--vae_path", vae, "--save_dir", str(diffusion_dir),
                     "--model_name", "run", "--lr_anneal_steps", "2", *TINY_UNET])
    return {"root": root, "vae": vae, "ae_dir": ae_dir, "diffusion_dir": diffusion_dir / "run", **files}


def copy_of(folder, tmp_path):
    target = tmp_path / Path(folder).name
    shutil.copytree(folder, target)
    return target


def ae_resume(workspace, folder, data, *extra):
    return VAE_train.main(["--data_dir", data, "--save_dir", str(folder), "--max_steps", "4", "--state_dict",
                           str(folder), *TINY_AE, *map(str, extra)])


def diffusion_resume(workspace, folder, data, *extra):
    return cell_train.main(["--data_dir", data, "--vae_path", workspace["vae"], "--save_dir", str(folder.parent),
                            "--model_name", folder.name, "--lr_anneal_steps", "4", "--resume_checkpoint",
                            str(folder), *TINY_UNET, *map(str, extra)])


def refused(capsys, run, *expected):
    """``run()`` exits 2 with one error line holding every ``expected`` text (test_input_checks' check)."""
    return one_line_error(capsys, lambda argv: run(), [], *expected)


# ---- the fingerprint itself --------------------------------------------------------------------------------------
def test_the_fingerprint_is_the_same_streamed_in_any_blocks_and_in_memory(workspace):
    prints = []
    for backed, block_rows in ((False, 4096), (True, 7), (True, 64)):
        dataset = load_dataset(workspace["data"], backed=backed, block_rows=block_rows)
        prints.append(dataset.fingerprint)
        dataset.close()
    assert prints[0] == prints[1] == prints[2]
    assert {"genes", "cells", "matrix"} <= set(prints[0])
    for variant in ("other_cells", "reordered", "swapped"):
        dataset = load_dataset(workspace[variant])
        assert dataset.fingerprint["matrix"] != prints[0]["matrix"], variant
        dataset.close()


# ---- the autoencoder -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, expected", [("other_cells", "other cells"),
                                               ("reordered", "the same cells in another order"),
                                               ("swapped", "other values")])
def test_autoencoder_refuses_to_resume_on_other_data(workspace, tmp_path, capsys, variant, expected):
    folder = copy_of(workspace["ae_dir"], tmp_path)
    line = refused(capsys, lambda: ae_resume(workspace, folder, workspace[variant]), expected, NEW_DATA,
                   "--state_dict")
    assert "was trained on other data" in line
    assert not list(folder.glob("model_seed=0_step=4.pt"))


def test_autoencoder_resumes_on_its_own_data_without_a_word(workspace, tmp_path, capsys):
    folder = copy_of(workspace["ae_dir"], tmp_path)
    path = ae_resume(workspace, folder, workspace["data"])
    assert path.endswith("model_seed=0_step=4.pt")
    assert "warning" not in capsys.readouterr().err
    assert "data_changes" not in load_checkpoint(path) or not load_checkpoint(path)["data_changes"]


def test_autoencoder_continues_on_new_data_when_asked_and_records_it(workspace, tmp_path):
    folder = copy_of(workspace["ae_dir"], tmp_path)
    path = ae_resume(workspace, folder, workspace["other_cells"], *NEW_DATA.split())
    payload = load_checkpoint(path)
    dataset = load_dataset(workspace["other_cells"], label_keys=[], require_labels=False)
    assert payload["data_fingerprint"] == dataset.fingerprint
    dataset.close()
    (change,) = payload["data_changes"]
    assert change["step"] == 2 and "other cells" in change["differences"]
    assert change["data_dir"] == workspace["other_cells"]


def remove_fingerprint(model):
    """Rewrite ``model`` as a checkpoint written before the data fingerprint."""
    payload = load_checkpoint(model)
    payload.pop("data_fingerprint", None)
    kind = payload.pop("kind")
    payload.pop("format_version", None)
    save_checkpoint(payload, model, kind=kind)


def test_autoencoder_checkpoint_without_a_fingerprint_resumes_with_a_warning(workspace, tmp_path, capsys):
    folder = copy_of(workspace["ae_dir"], tmp_path)
    model = folder / "model_seed=0_step=2.pt"
    remove_fingerprint(model)
    capsys.readouterr()
    ae_resume(workspace, folder, workspace["other_cells"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "cannot be checked" in err[0], err


# ---- the diffusion trainer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, expected", [("other_cells", "other cells"),
                                               ("reordered", "the same cells in another order"),
                                               ("swapped", "other values")])
def test_diffusion_refuses_to_resume_on_other_data(workspace, tmp_path, capsys, variant, expected):
    folder = copy_of(workspace["diffusion_dir"], tmp_path)
    line = refused(capsys, lambda: diffusion_resume(workspace, folder, workspace[variant]), expected, NEW_DATA,
                   "--resume_checkpoint")
    assert "was trained on other data" in line
    assert not (folder / "model000004.pt").exists()


def test_diffusion_resumes_on_its_own_data_streamed_too(workspace, tmp_path, capsys):
    folder = copy_of(workspace["diffusion_dir"], tmp_path)
    path = diffusion_resume(workspace, folder, workspace["data"], "--backed", "True", "--block_rows", "16")
    assert path.endswith("model000004.pt")
    assert "warning" not in capsys.readouterr().err


def test_diffusion_continues_on_new_data_when_asked_and_records_it(workspace, tmp_path):
    folder = copy_of(workspace["diffusion_dir"], tmp_path)
    recorded = load_checkpoint(folder / "model000002.pt")
    path = diffusion_resume(workspace, folder, workspace["other_cells"], *NEW_DATA.split())
    dataset = load_dataset(workspace["other_cells"], label_keys=["cell_type1"])
    for name in (path, folder / "ema_0.9999_000004.pt"):
        payload = load_checkpoint(name)
        assert payload["data_fingerprint"] == dataset.fingerprint
        (change,) = payload["data_changes"]
        assert change["step"] == 2 and "other cells" in change["differences"]
        assert payload["latent_scale"] == recorded["latent_scale"]  # the model's scale is kept
    dataset.close()


def test_diffusion_checkpoint_without_a_fingerprint_resumes_with_a_warning(workspace, tmp_path, capsys):
    folder = copy_of(workspace["diffusion_dir"], tmp_path)
    model = folder / "model000002.pt"
    remove_fingerprint(model)
    capsys.readouterr()
    diffusion_resume(workspace, folder, workspace["reordered"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "cannot be checked" in err[0], err
