"""benchmarks/bench_diffusion_gap.py: decoded means as the autoencoder gives them, and a run end to end on a
samples folder in cell_sample.py's layout."""
import json
import sys

import numpy as np
import pandas as pd
import torch

from benchmarks import bench_diffusion_gap as gap
from guided_diffusion.data import load_dataset
from guided_diffusion.sampling.writer import write_decoded_h5ad
from VAE import VAE_train
from VAE.VAE_model import load_autoencoder


def trained_autoencoder(counts_h5ad, tmp_path):
    path = VAE_train.main(["--data_dir", str(counts_h5ad), "--save_dir", str(tmp_path / "ae"), "--progress", "False",
                           "--max_steps", "20", "--checkpoint_freq", "20", "--hidden_dims", "16", "--latent_dim", "4"])
    return path, load_autoencoder(path)[0]


def test_decoded_means_are_the_decoders_and_the_run_scores_every_set(counts_h5ad, tmp_path, monkeypatch, capsys):
    path, autoencoder = trained_autoencoder(counts_h5ad, tmp_path)
    dataset = load_dataset(str(counts_h5ad), label_keys=["cell_type1"])
    latents = autoencoder.encode_dataset(dataset, progress=False)
    labels = np.array(dataset.label_strings("cell_type1", dataset.label_codes[:, 0]))
    library = np.maximum(dataset.library_sizes(), 1.0)
    codes = torch.from_numpy(dataset.label_codes[:, 0])  # the decoder reads the cell type (the default)
    dataset.close()
    np.testing.assert_allclose(gap.decoded_means(autoencoder, latents, labels, "cell_type1"),
                               autoencoder.model.decode(torch.from_numpy(latents), codes).numpy(), rtol=1e-5,
                               atol=1e-6)
    samples = tmp_path / "samples"  # the training latents as "generated" cells, cell_sample.py's layout
    samples.mkdir()
    np.save(samples / "cell0_cache1_uniform.npy", latents)
    obs = pd.DataFrame({"cell_type1": pd.Categorical(labels)}, index=[f"g{i}" for i in range(len(labels))])
    write_decoded_h5ad(str(samples / "generated.h5ad"), autoencoder, torch.from_numpy(latents), obs,
                       {"cfdiffusion": {}}, progress=False, library_sizes=library.astype(np.float32))
    (samples / "manifest.json").write_text(json.dumps({"files": ["cell0_cache1_uniform.npy", "generated.h5ad"]}))
    out = tmp_path / "gap"
    monkeypatch.setattr(sys, "argv", ["bench_diffusion_gap.py", "--vae_path", path, "--fit", str(counts_h5ad),
                                      "--validation", str(counts_h5ad), "--samples", str(samples), "--draws", "1",
                                      "--noise", "0.5", "--out", str(out)])
    gap.main()
    table = pd.read_csv(out / "diffusion_gap.tsv", sep="\t")
    assert list(table["set"]) == ["training_latents", "training_latents_noise_0.5", "generated",
                                  "means_generated_vs_training"]
    assert table[["knn_auc", "rf_auc"]].apply(lambda c: c.between(0, 1)).all().all()
    # the "generated" latents are the training latents: their decoded means are the same points, which no
    # classifier separates (each point's twin sits on the other side: out-of-fold AUCs at or below 0.5)
    scores = table.set_index("set")
    assert scores.loc["means_generated_vs_training", "knn_auc"] <= 0.5
    assert scores.loc["means_generated_vs_training", "rf_auc"] <= 0.5
