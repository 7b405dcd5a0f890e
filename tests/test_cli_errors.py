"""The catalogue of errors (docs/errors.md): every bad input is refused with one clear line, and no run ever loses work.

* The catalogue of bad inputs (docs/errors.md): one test per case, each through a script's real
  ``main(argv)``; a representative few also as real subprocesses (one stderr line, exit code, no traceback).
* Checkpoints: atomic, plain tensors/containers only (``torch.load(weights_only=True)``), format version.
* Exact resume: both trainers are killed with SIGKILL (and interrupted with SIGINT) as real subprocesses,
  resumed from their newest checkpoint, and must end bit-identical to an uninterrupted run.
* Determinism: the same seed gives the same generated h5ad.

Everything runs on one CPU thread (as the trainers' subprocesses do): results are bit-identical only
for the same thread count, and tiny models are much faster on one thread.
"""
import errno
import os
import signal
import subprocess
import sys
import time

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import cell_sample
import cell_train
from exp_script import evaluate as evaluate_script
from guided_diffusion.core import container as checkpoint_module
from guided_diffusion.core.container import FORMAT_VERSION, load_checkpoint, save_checkpoint
from guided_diffusion.training.loop import StopAtStepBoundary
from guided_diffusion.core.errors import UsageError
from guided_diffusion.checkpoints import latest_model_file
from synthetic import REPO_ROOT, make_counts_adata
from VAE import VAE_train

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY_AE = ["--hidden_dims", "16", "16", "16", "--latent_dim", "8", "--batch_size", "16", "--progress", "False"]
TINY_UNET = ["--hidden_dims", "16", "16", "8", "8", "--batch_size", "16", "--progress", "False"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Counts (two label keys; no type_2 cell of donor1), a tiny autoencoder and a tiny diffusion model."""
    root = tmp_path_factory.mktemp("reliability")
    adata = make_counts_adata(n_cells=120, n_genes=30, seed=1)
    donors = adata.obs["donor"].astype(str).to_numpy()
    donors[adata.obs["cell_type1"].astype(str).to_numpy() == "type_2"] = "donor0"
    adata.obs["donor"] = pd.Categorical(donors)
    data = root / "counts.h5ad"
    adata.write_h5ad(data)
    vae = VAE_train.main(["--data_dir", str(data), "--save_dir", str(root / "ae"), "--max_steps", "4", *TINY_AE])
    model = cell_train.main(["--data_dir", str(data), "--vae_path", vae, "--save_dir", str(root / "diffusion"),
                             "--model_name", "tiny", "--label_key", "cell_type1", "--label_key", "donor",
                             "--lr_anneal_steps", "2", "--save_interval", "2", *TINY_UNET])
    text_file = root / "notes.txt"
    text_file.write_text("not an h5ad\n")
    return {"root": root, "data": str(data), "vae": vae, "model": model, "adata": adata,
            "text_file": str(text_file)}


# ---- helpers ---------------------------------------------------------------------------------------
def refused(capsys, main, argv, expected, code=2):
    """Run ``main(argv)``; it must exit with ``code`` after exactly one stderr line containing ``expected``."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(item) for item in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert expected in lines[0], lines[0]
    return lines[0]


def run_script(script, *argv, code=2, expected=""):
    """Run a script as a real process; exactly one stderr line, the exit code, no traceback."""
    result = subprocess.run([sys.executable, script, *map(str, argv)], cwd=REPO_ROOT, env=SUBPROCESS_ENV,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def write_h5ad(path, adata):
    adata.write_h5ad(path)
    return str(path)


def train_ae(data, save_dir, *extra):
    return ["--data_dir", data, "--save_dir", save_dir, "--max_steps", "2", *TINY_AE, *extra]


def train_diffusion(workspace, save_dir, *extra, data=None):
    return ["--data_dir", data or workspace["data"], "--vae_path", workspace["vae"], "--save_dir", save_dir,
            "--lr_anneal_steps", "2", *TINY_UNET, *extra]


def sample(workspace, sample_dir, *extra, model=None):
    return [str(item) for item in ["--model_path", model or workspace["model"], "--sample_dir", sample_dir,
                                   "--num_samples", "2", "--timestep_respacing", "ddim4", "--use_ddim", "True",
                                   "--progress", "False", *extra]]


def files_in(folder):
    """Every file under ``folder`` (hidden temporaries included); empty if it does not exist."""
    found = []
    for base, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(base, name), folder) for name in names]
    return sorted(found)


# ---- the catalogue: data files -----------------------------------------------------------------------
def test_missing_data_file(tmp_path, capsys):
    refused(capsys, VAE_train.main, train_ae(str(tmp_path / "absent.h5ad"), tmp_path / "out"),
            f"data file not found: {tmp_path / 'absent.h5ad'}")
    assert files_in(tmp_path) == []


def test_missing_data_file_as_a_real_process(tmp_path):
    run_script("VAE/VAE_train.py", *train_ae(str(tmp_path / "absent.h5ad"), tmp_path / "out"),
               expected="data file not found")
    assert not (tmp_path / "out").exists()


def test_unreadable_data_file(workspace, tmp_path, capsys, monkeypatch):
    path = tmp_path / "locked.h5ad"
    path.write_bytes(open(workspace["data"], "rb").read())
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads any file: make the loader's open fail the way it does for other users
        import guided_diffusion.data.files as data_module

        def denied(name, *args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)

        monkeypatch.setattr(data_module, "open", denied, raising=False)
    refused(capsys, VAE_train.main, train_ae(str(path), tmp_path / "out"),
            f"cannot read {path}: Permission denied; check the file's permissions")


def test_data_path_is_a_directory(tmp_path, capsys):
    refused(capsys, VAE_train.main, train_ae(str(tmp_path), tmp_path / "out"),
            "is a directory; --data_dir takes the path of an .h5ad file")


def test_file_that_is_not_h5ad(workspace, tmp_path, capsys):
    refused(capsys, VAE_train.main, train_ae(workspace["text_file"], tmp_path / "out"),
            "is not an .h5ad file (not HDF5); save it with anndata's write_h5ad")


def test_hdf5_file_that_is_not_anndata(tmp_path, capsys):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as store:
        store["values"] = np.arange(4)
    refused(capsys, VAE_train.main, train_ae(str(path), tmp_path / "out"),
            "is an HDF5 file but not an .h5ad (no obs/var groups)")


def test_truncated_h5ad(workspace, tmp_path, capsys):
    path = tmp_path / "truncated.h5ad"
    path.write_bytes(open(workspace["data"], "rb").read()[:3000])
    refused(capsys, VAE_train.main, train_ae(str(path), tmp_path / "out"), "truncated or corrupt")


def test_zero_cells(workspace, tmp_path, capsys):
    path = write_h5ad(tmp_path / "empty.h5ad", workspace["adata"][:0].copy())
    refused(capsys, VAE_train.main, train_ae(path, tmp_path / "out"), f"{path} has zero cells")


def test_zero_genes(workspace, tmp_path, capsys):
    path = write_h5ad(tmp_path / "no_genes.h5ad", workspace["adata"][:, :0].copy())
    refused(capsys, VAE_train.main, train_ae(path, tmp_path / "out"), f"{path} has zero genes")


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_or_infinite_values(workspace, tmp_path, capsys, value):
    adata = workspace["adata"].copy()
    adata.X.data[3] = value
    refused(capsys, VAE_train.main, train_ae(write_h5ad(tmp_path / "bad.h5ad", adata), tmp_path / "out"),
            "the expression matrix contains NaN or infinite values; clean the file first")


def test_negative_values(workspace, tmp_path, capsys):
    adata = workspace["adata"].copy()
    adata.X.data[3] = -2.0
    refused(capsys, VAE_train.main, train_ae(write_h5ad(tmp_path / "bad.h5ad", adata), tmp_path / "out"),
            "the expression matrix contains negative values")


def test_non_integer_counts_name_the_log_flag(workspace, tmp_path, capsys):
    adata = workspace["adata"].copy()
    adata.X.data[3] = 0.5
    refused(capsys, VAE_train.main, train_ae(write_h5ad(tmp_path / "bad.h5ad", adata), tmp_path / "out"),
            "non-integer values but raw counts are expected; if it is already log-normalized, "
            "pass --input_is_log True")


def test_label_key_not_in_obs_lists_the_columns(workspace, tmp_path, capsys):
    refused(capsys, cell_train.main, train_diffusion(workspace, tmp_path, "--label_key", "celltype"),
            "label key 'celltype' not in obs; available columns: cell_type1, donor")
    assert files_in(tmp_path) == []


def test_genes_differ_from_the_autoencoder(workspace, tmp_path, capsys):
    adata = make_counts_adata(n_cells=40, n_genes=33)
    line = refused(capsys, cell_train.main,
                   train_diffusion(workspace, tmp_path, data=write_h5ad(tmp_path / "other.h5ad", adata)),
                   "the data has 33 genes, the autoencoder")
    assert "3 not in the autoencoder" in line and "(first: gene30, gene31, gene32)" in line


def test_num_genes_contradicts_the_data(workspace, tmp_path, capsys):
    refused(capsys, VAE_train.main, train_ae(workspace["data"], tmp_path, "--num_genes", "20125"),
            "--num_genes 20125 contradicts the data, which has 30 genes; omit --num_genes or fix it")
    assert files_in(tmp_path) == []


def test_num_classes_contradicts_the_data(workspace, tmp_path, capsys):
    refused(capsys, cell_train.main, train_diffusion(workspace, tmp_path, "--num_classes", "14"),
            "--num_classes 14 contradicts the data (cell_type1: 3); omit it or fix the value")


def test_num_classes_contradicts_the_checkpoint(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--num_classes", "14"),
            "--num_classes 14 contradicts the checkpoint (3 2); omit it")


def test_unknown_condition_value_lists_the_valid_ones(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--condition", "cell_type1=neuron"),
            "--condition cell_type1=neuron: unknown value; valid values of cell_type1: type_0, type_1, type_2")
    assert files_in(tmp_path) == []


def test_unknown_condition_key_lists_the_label_keys(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--condition", "tissue=pancreas"),
            "--condition key 'tissue' is not a label key of this model; label keys: cell_type1, donor")


def test_match_counts_condition_without_training_cells(workspace, tmp_path, capsys):
    argv = sample(workspace, tmp_path, "--condition", "cell_type1=type_2,donor=donor1", "--match_counts")
    del argv[argv.index("--num_samples"):argv.index("--num_samples") + 2]  # issue 25: not with --match_counts
    refused(capsys, cell_sample.main, argv,
            "--match_counts: condition cell_type1=type_2,donor=donor1 has no training cells; "
            "give --num_samples without --match_counts")
    assert files_in(tmp_path) == []


# ---- the catalogue: checkpoints ----------------------------------------------------------------------
def test_truncated_checkpoint(workspace, tmp_path, capsys):
    path = tmp_path / "model000002.pt"
    path.write_bytes(open(workspace["model"], "rb").read()[:2000])
    refused(capsys, cell_sample.main, sample(workspace, tmp_path / "out", model=str(path)),
            f"cannot read checkpoint {path}: it is truncated, corrupt or not a cfDiffusion checkpoint")


def test_corrupt_checkpoint_as_a_real_process(workspace, tmp_path):
    path = tmp_path / "model000002.pt"
    data = bytearray(open(workspace["model"], "rb").read())
    data[100:400] = bytes(300)  # a zeroed block, as a disk error leaves it (random bytes made the test flaky)
    path.write_bytes(bytes(data))
    run_script("cell_sample.py", *sample(workspace, tmp_path / "out", model=str(path)),
               expected="truncated, corrupt or not a cfDiffusion checkpoint")
    assert not (tmp_path / "out").exists()


def test_autoencoder_checkpoint_where_a_diffusion_one_is_expected(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, model=workspace["vae"]),
            "is an autoencoder checkpoint (VAE/VAE_train.py), but a diffusion model checkpoint")


def test_diffusion_checkpoint_where_an_autoencoder_is_expected(workspace, tmp_path, capsys):
    argv = train_diffusion(workspace, tmp_path)
    argv[argv.index("--vae_path") + 1] = workspace["model"]
    refused(capsys, cell_train.main, argv,
            "is a diffusion model checkpoint (cell_train.py model*.pt), but an autoencoder checkpoint "
            "(VAE/VAE_train.py) is expected here")


def test_autoencoder_checkpoint_given_to_resume_the_diffusion_trainer(workspace, tmp_path, capsys):
    refused(capsys, cell_train.main, train_diffusion(workspace, tmp_path, "--resume_checkpoint", workspace["vae"]),
            "is an autoencoder checkpoint (VAE/VAE_train.py), but a diffusion model checkpoint")


def test_checkpoint_of_a_newer_format_version(workspace, tmp_path, capsys):
    payload = torch.load(workspace["vae"], weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    refused(capsys, VAE_train.main, train_ae(workspace["data"], tmp_path / "out", "--state_dict", newer),
            f"has checkpoint format version {FORMAT_VERSION + 1}, newer than this code reads "
            f"({FORMAT_VERSION}); update cfDiffusion")


class _Payload:
    """Unpickling this would create a marker file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_an_arbitrary_object_is_refused_not_executed(workspace, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    malicious = tmp_path / "model000002.pt"
    torch.save({"format_version": 1, "kind": "diffusion_model", "hook": _Payload(str(marker))}, malicious)
    line = refused(capsys, cell_sample.main, sample(workspace, tmp_path / "out", model=str(malicious)),
                   f"refusing to load {malicious}: it holds Python objects other than tensors")
    assert "it was not loaded" in line
    assert not marker.exists()


def test_file_that_is_not_a_checkpoint(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, model=workspace["text_file"]),
            "it is truncated, corrupt or not a cfDiffusion checkpoint")


def test_missing_checkpoint(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, model=str(tmp_path / "model000009.pt")),
            f"checkpoint not found: {tmp_path / 'model000009.pt'}")


# ---- the catalogue: flags ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-1"])
def test_cache_interval_not_positive(workspace, tmp_path, capsys, value):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--cache_interval", value),
            f"--cache_interval must be 1 or more (1 = no feature reuse), got {value}")


def test_cache_interval_not_positive_when_training(workspace, tmp_path, capsys):
    refused(capsys, cell_train.main, train_diffusion(workspace, tmp_path, "--cache_interval", "0"),
            "argument --cache_interval: must be a positive integer, got 0; see")


def test_branch_out_of_range_when_sampling(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--branch", "9", "--cache_interval", "2"),
            "cache branch must be an int in [0, 2]")


def test_branch_out_of_range_when_training(workspace, tmp_path, capsys):
    refused(capsys, cell_train.main, train_diffusion(workspace, tmp_path, "--branch", "9"), "--branch 9:")


@pytest.mark.parametrize("script, flag, value", [
    ("VAE_train", "--max_steps", "0"),
    ("cell_train", "--lr_anneal_steps", "-5"),
    ("cell_train", "--save_interval", "0"),
    ("VAE_train", "--checkpoint_freq", "0"),
])
def test_steps_not_positive(workspace, tmp_path, capsys, script, flag, value):
    main, argv = ((VAE_train.main, train_ae(workspace["data"], tmp_path)) if script == "VAE_train"
                  else (cell_train.main, train_diffusion(workspace, tmp_path)))
    refused(capsys, main, [*argv, flag, value], f"argument {flag}: must be ")


def test_sampling_steps_not_positive(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--timestep_respacing", "ddim0"),
            "--timestep_respacing 'ddim0'")


@pytest.mark.parametrize("script", ["VAE_train", "cell_train", "cell_sample"])
def test_batch_size_not_positive(workspace, tmp_path, capsys, script):
    main, argv = {"VAE_train": (VAE_train.main, train_ae(workspace["data"], tmp_path)),
                  "cell_train": (cell_train.main, train_diffusion(workspace, tmp_path)),
                  "cell_sample": (cell_sample.main, sample(workspace, tmp_path))}[script]
    refused(capsys, main, [*argv, "--batch_size", "0"], "argument --batch_size: must be a positive integer, got 0")


def test_num_samples_not_positive(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--num_samples", "-3"),
            "argument --num_samples: must be a positive integer, got -3")


def test_num_samples_not_a_number(workspace, tmp_path, capsys):
    refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--num_samples", "many"),
            "argument --num_samples: expected an integer, got 'many'")


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "argument --lr: must be a positive number, got -1"),
    ("--weight_decay", "-0.1", "argument --weight_decay: must be zero or positive, got -0.1"),
    ("--ema_rate", "1.5", "argument --ema_rate: must be in [0, 1], got 1.5"),
    ("--p_uncond", "2", "argument --p_uncond: must be in [0, 1], got 2"),
    ("--dropout", "1", "argument --dropout: must be in [0, 1), got 1"),
    ("--max_minutes", "0", "argument --max_minutes: must be a positive number, got 0"),
])
def test_out_of_range_training_numbers(workspace, tmp_path, capsys, flag, value, message):
    refused(capsys, cell_train.main, train_diffusion(workspace, tmp_path, flag, value), message)


def test_junk_boolean(workspace, tmp_path, capsys):
    line = refused(capsys, cell_sample.main, sample(workspace, tmp_path, "--use_ema", "maybe"),
                   "argument --use_ema: expected True or False, got 'maybe'")
    assert line.endswith("--help")


def test_junk_boolean_as_a_real_process(workspace, tmp_path):
    line = run_script("cell_sample.py", *sample(workspace, tmp_path, "--use_ema", "maybe"),
                      expected="argument --use_ema: expected True or False, got 'maybe'")
    assert line == "error: argument --use_ema: expected True or False, got 'maybe'; see cell_sample.py --help"


def test_missing_required_flag_and_unknown_flag(tmp_path, capsys):
    refused(capsys, VAE_train.main, ["--save_dir", tmp_path],
            "the following arguments are required: --data_dir")
    refused(capsys, cell_sample.main, ["--model_path", "x.pt", "--colour", "blue"],
            "unrecognized arguments: --colour blue")


# ---- the catalogue: outputs and devices ------------------------------------------------------------------
def test_output_folder_under_a_file(workspace, tmp_path, capsys):
    blocked = os.path.join(workspace["text_file"], "out")
    refused(capsys, VAE_train.main, train_ae(workspace["data"], blocked),
            f"cannot write to --save_dir {blocked}: {workspace['text_file']} is a file, not a folder")
    refused(capsys, cell_train.main, train_diffusion(workspace, blocked),
            f"{workspace['text_file']} is a file, not a folder; choose a folder you can write to")
    refused(capsys, cell_sample.main, sample(workspace, blocked),
            f"cannot write to --sample_dir {blocked}: {workspace['text_file']} is a file")


def test_output_folder_that_is_a_file(workspace, capsys):
    refused(capsys, cell_sample.main, sample(workspace, workspace["text_file"]),
            f"cannot write to --sample_dir {workspace['text_file']}: it is a file, not a folder")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_folder_that_cannot_be_written(workspace, capsys):
    refused(capsys, cell_sample.main, sample(workspace, "/proc/cfdiffusion-output"),
            "cannot write to --sample_dir /proc/cfdiffusion-output (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("script", ["VAE_train", "cell_train", "cell_sample"])
def test_cuda_requested_where_there_is_none(workspace, tmp_path, capsys, script):
    main, argv = {"VAE_train": (VAE_train.main, train_ae(workspace["data"], tmp_path)),
                  "cell_train": (cell_train.main, train_diffusion(workspace, tmp_path)),
                  "cell_sample": (cell_sample.main, sample(workspace, tmp_path))}[script]
    refused(capsys, main, [*argv, "--device", "cuda"],
            "--device cuda was requested but no CUDA device is available; use --device cpu")


def test_disk_full_while_saving_leaves_no_checkpoint(workspace, tmp_path, capsys, monkeypatch):
    def disk_full(payload, stream, *args, **kwargs):
        stream.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    refused(capsys, VAE_train.main, train_ae(workspace["data"], tmp_path), "No space left on device", code=1)
    assert [name for name in files_in(tmp_path) if name.endswith(".pt") or ".tmp" in name] == []


def test_failure_while_writing_samples_leaves_no_h5ad(workspace, tmp_path, capsys, monkeypatch):
    import guided_diffusion.sampling.writer as sampling

    real_write_elem = sampling.write_elem

    def fail_on_uns(store, key, value, *args, **kwargs):
        if key == "uns":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write_elem(store, key, value, *args, **kwargs)

    monkeypatch.setattr(sampling, "write_elem", fail_on_uns)
    refused(capsys, cell_sample.main, sample(workspace, tmp_path), "Input/output error", code=1)
    assert not any(name.endswith(".h5ad") or ".tmp" in name for name in files_in(tmp_path))


def test_unexpected_error_is_one_line_with_a_debug_hint(workspace, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr("guided_diffusion.sampling.pipeline.plan_conditions", broken)
    line = refused(capsys, cell_sample.main, sample(workspace, tmp_path), "unexpected RuntimeError", code=1)
    assert "something nobody foresaw second line" in line and "--debug" in line


def test_debug_shows_the_traceback(workspace, tmp_path):
    result = subprocess.run([sys.executable, "cell_sample.py", *sample(workspace, tmp_path, model="absent.pt"),
                             "--debug"], cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UsageError: checkpoint not found: absent.pt" in result.stderr


# ---- the catalogue: exp_script/evaluate.py ---------------------------------------------------------------
def evaluate_args(workspace, generated, out, *extra):
    return ["--real", workspace["data"], "--generated", generated, "--out", out, "--progress", "False",
            "--plots", "False", *extra]


def test_evaluate_missing_generated_file(workspace, tmp_path, capsys):
    refused(capsys, evaluate_script.main, evaluate_args(workspace, tmp_path / "absent.h5ad", tmp_path / "out"),
            f"data file not found: {tmp_path / 'absent.h5ad'}")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_evaluate_junk_boolean(workspace, tmp_path, capsys):
    refused(capsys, evaluate_script.main, evaluate_args(workspace, workspace["data"], tmp_path, "--plots", "sure"),
            "argument --plots: expected True or False, got 'sure'")


def test_evaluate_output_folder_under_a_file_as_a_real_process(workspace):
    blocked = os.path.join(workspace["text_file"], "evaluation")
    run_script("exp_script/evaluate.py", *evaluate_args(workspace, workspace["data"], blocked),
               expected=f"cannot write to --out {blocked}: {workspace['text_file']} is a file, not a folder")


# ---- checkpoints ----------------------------------------------------------------------------------------
def test_every_checkpoint_is_plain_and_versioned(workspace):
    folder = os.path.dirname(workspace["model"])
    paths = {"autoencoder": workspace["vae"], "diffusion_model": workspace["model"],
             "diffusion_ema": os.path.join(folder, "ema_0.9999_000002.pt"),
             "diffusion_optimizer": os.path.join(folder, "opt000002.pt")}
    for kind, path in paths.items():
        payload = torch.load(path, weights_only=True)  # plain tensors and containers only
        assert payload["format_version"] == FORMAT_VERSION and payload["kind"] == kind
        assert load_checkpoint(path, kinds=(kind,))["kind"] == kind


def test_save_refuses_non_plain_values_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint entry payload\['loss'\] is a numpy.float32"):
        save_checkpoint({"loss": np.float32(0.5)}, tmp_path / "model.pt", kind="autoencoder")
    assert files_in(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint({"step": 1}, path, kind="autoencoder")

    def interrupted(payload, stream, *args, **kwargs):
        stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path, kind="autoencoder")
    assert load_checkpoint(path)["step"] == 1
    assert files_in(tmp_path) == ["model.pt"]


def test_latest_model_file_skips_incomplete_sets(tmp_path):
    for name in ["model000010.pt", "opt000010.pt", "ema_0.9999_000010.pt", "opt000020.pt",
                 "ema_0.9999_000020.pt", ".model000020.pt.tmp-x1y2", "model000030.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert latest_model_file(str(tmp_path)) == str(tmp_path / "model000010.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no complete checkpoint"):
        latest_model_file(str(tmp_path / "empty"))


def test_stop_request_defers_signals_to_the_step_boundary():
    previous = signal.getsignal(signal.SIGINT)
    with StopAtStepBoundary() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 128 + signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


# ---- exact resume after SIGKILL / SIGINT, as real processes ------------------------------------------------
AE_RUN = ["--max_steps", "300", "--checkpoint_freq", "30", "--dropout", "0.1", "--seed", "3", "--log_interval", "1000",
          *TINY_AE]
DIFFUSION_RUN = ["--lr_anneal_steps", "240", "--save_interval", "30", "--label_key", "cell_type1",
                 "--label_key", "donor", "--p_uncond", "0.3", "--dropout", "0.1", "--log_interval", "1000", *TINY_UNET]


def ae_argv(workspace, save_dir, *extra):
    return ["--data_dir", workspace["data"], "--save_dir", str(save_dir), *AE_RUN, *map(str, extra)]


def diffusion_argv(workspace, save_dir, *extra):
    return ["--data_dir", workspace["data"], "--vae_path", workspace["vae"], "--save_dir", str(save_dir),
            "--model_name", "run", *DIFFUSION_RUN, *map(str, extra)]


def load_with_path(path):
    return dict(load_checkpoint(path), path=path)


def opt_beside(autoencoder):
    """The optimizer file beside an autoencoder checkpoint (loaded by load_with_path)."""
    folder, name = os.path.split(autoencoder["path"])
    return os.path.join(folder, "opt_" + name[len("model_"):])


@pytest.fixture(scope="module")
def ae_reference(workspace):
    """The uninterrupted autoencoder run every interrupted one must reproduce bit for bit."""
    return load_with_path(VAE_train.main(ae_argv(workspace, workspace["root"] / "ae_reference")))


@pytest.fixture(scope="module")
def diffusion_reference(workspace):
    final = cell_train.main(diffusion_argv(workspace, workspace["root"] / "diffusion_reference"))
    return final_diffusion_state(os.path.dirname(final), 240)


def final_diffusion_state(folder, step):
    return {"model": load_checkpoint(os.path.join(folder, f"model{step:06d}.pt")),
            "ema": load_checkpoint(os.path.join(folder, f"ema_0.9999_{step:06d}.pt")),
            "opt": load_checkpoint(os.path.join(folder, f"opt{step:06d}.pt"))}


def assert_bit_identical(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def assert_same_optimizer(first, second):
    assert first["param_groups"] == second["param_groups"]
    for index, state in first["state"].items():
        for key, value in state.items():
            assert torch.equal(value, second["state"][index][key]), (index, key)


def start(script, argv, prefix=()):
    command = [sys.executable, *prefix, *([script] if script else []), *map(str, argv)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_file(process, path, timeout=90):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the trainer ended (exit {process.returncode}) before {path} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def kill_after_first_checkpoint(process, first_checkpoint, delay=0.1):
    """SIGKILL a trainer somewhere between checkpoints (shortly after its first one)."""
    wait_for_file(process, first_checkpoint)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the trainer finished before it could be killed"


def test_autoencoder_killed_and_resumed_is_bit_identical(workspace, ae_reference, tmp_path):
    process = start("VAE/VAE_train.py", ae_argv(workspace, tmp_path))
    kill_after_first_checkpoint(process, tmp_path / "model_seed=3_step=30.pt")
    assert not (tmp_path / "model_seed=3_step=300.pt").exists()
    # resume from the folder: the newest checkpoint of this seed
    final = load_with_path(VAE_train.main(ae_argv(workspace, tmp_path, "--state_dict", tmp_path)))
    assert final["step"] == ae_reference["step"] == 300
    assert_bit_identical(ae_reference["state_dict"], final["state_dict"])
    assert_same_optimizer(load_checkpoint(opt_beside(ae_reference))["optimizer"],
                          load_checkpoint(opt_beside(final))["optimizer"])


def test_autoencoder_ctrl_c_saves_a_resumable_checkpoint(workspace, ae_reference, tmp_path):
    process = start("VAE/VAE_train.py", ae_argv(workspace, tmp_path))
    wait_for_file(process, tmp_path / "model_seed=3_step=30.pt")
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    saved = out.strip().splitlines()[-1].split("saved ")[1].split(";")[0]
    assert "resume with --state_dict" in out and "SIGINT received" in err and "Traceback" not in err
    interrupted = load_checkpoint(saved)
    assert 30 <= interrupted["step"] < 300 and saved.endswith(f"_step={interrupted['step']}.pt")
    final = load_checkpoint(VAE_train.main(ae_argv(workspace, tmp_path, "--state_dict", saved)))
    assert_bit_identical(ae_reference["state_dict"], final["state_dict"])


def test_diffusion_killed_and_resumed_is_bit_identical(workspace, diffusion_reference, tmp_path):
    folder = tmp_path / "run"
    process = start("cell_train.py", diffusion_argv(workspace, tmp_path))
    kill_after_first_checkpoint(process, folder / "model000030.pt")
    assert not (folder / "model000240.pt").exists()
    cell_train.main(diffusion_argv(workspace, tmp_path, "--resume_checkpoint", folder))
    final = final_diffusion_state(folder, 240)
    for part in ("model", "ema"):
        assert_bit_identical(diffusion_reference[part]["state_dict"], final[part]["state_dict"])
    assert_same_optimizer(diffusion_reference["opt"]["optimizer"], final["opt"]["optimizer"])


KILL_WHILE_WRITING_MODEL_60 = """
import os, signal, sys, torch
real_save = torch.save
def save_then_die(payload, stream, *args, **kwargs):
    if payload.get("kind") == "diffusion_model" and payload.get("step") == 60:
        stream.write(b"the first bytes of a checkpoint")
        stream.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(payload, stream, *args, **kwargs)
torch.save = save_then_die
import cell_train
cell_train.main(sys.argv[1:])
"""


def test_diffusion_killed_while_writing_a_checkpoint(workspace, diffusion_reference, tmp_path):
    folder = tmp_path / "run"
    process = start(None, diffusion_argv(workspace, tmp_path), prefix=("-c", KILL_WHILE_WRITING_MODEL_60))
    process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL
    names = files_in(folder)
    assert "model000060.pt" not in names, "a half-written file must never carry the final name"
    # issue 25: a set is renamed only once all its files are written, so no step-60 file has its final name
    assert "model000030.pt" in names and not {"ema_0.9999_000060.pt", "opt000060.pt"} & set(names)
    assert any(name.startswith(".model000060.pt.tmp-") for name in names)
    assert latest_model_file(str(folder)) == str(folder / "model000030.pt")
    cell_train.main(diffusion_argv(workspace, tmp_path, "--resume_checkpoint", folder))
    final = final_diffusion_state(folder, 240)
    for part in ("model", "ema"):
        assert_bit_identical(diffusion_reference[part]["state_dict"], final[part]["state_dict"])
    assert not [name for name in files_in(folder) if ".tmp-" in name], "rewriting a file removes its stale temporary"


def test_diffusion_ctrl_c_saves_a_resumable_checkpoint(workspace, diffusion_reference, tmp_path):
    folder = tmp_path / "run"
    process = start("cell_train.py", diffusion_argv(workspace, tmp_path))
    wait_for_file(process, folder / "model000030.pt")
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "resume with --resume_checkpoint" in out and "Traceback" not in err
    saved = out.strip().splitlines()[-1].split("saved ")[1].split(";")[0]
    step = load_checkpoint(saved, kinds=("diffusion_model",))["step"]
    assert 30 <= step < 240 and os.path.exists(folder / f"opt{step:06d}.pt")
    cell_train.main(diffusion_argv(workspace, tmp_path, "--resume_checkpoint", saved))
    final = final_diffusion_state(folder, 240)
    for part in ("model", "ema"):
        assert_bit_identical(diffusion_reference[part]["state_dict"], final[part]["state_dict"])


# ---- determinism --------------------------------------------------------------------------------------------
def test_same_seed_same_generated_h5ad(workspace, tmp_path):
    flags = ["--seed", "11", "--num_samples", "3"]
    first = anndata.read_h5ad(cell_sample.main(sample(workspace, tmp_path / "a", *flags)))
    second = anndata.read_h5ad(cell_sample.main(sample(workspace, tmp_path / "b", *flags)))
    np.testing.assert_array_equal(first.X.toarray(), second.X.toarray())
    np.testing.assert_array_equal(first.layers["counts"].toarray(), second.layers["counts"].toarray())
    pd.testing.assert_frame_equal(first.obs, second.obs)
    pd.testing.assert_frame_equal(first.var, second.var)
    provenance = first.uns["cfdiffusion"]
    assert provenance.keys() == second.uns["cfdiffusion"].keys() and provenance["seed"] == 11
    for key, value in provenance.items():
        np.testing.assert_array_equal(value, second.uns["cfdiffusion"][key], err_msg=key)
    for name in files_in(tmp_path / "a"):
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name))
    other = anndata.read_h5ad(cell_sample.main(sample(workspace, tmp_path / "c", "--seed", "12", "--num_samples", "3")))
    assert not np.array_equal(other.X.toarray(), first.X.toarray())
