"""Encode real cells and decode them again (the autoencoder's ceiling, scored like generated cells), written
as an h5ad in the sampler's format; exp_script/reconstruct.py is its command line."""
import os

import pandas as pd

from guided_diffusion.sampling.settings import resolve_observation
from guided_diffusion.sampling.writer import write_decoded_h5ad


def reconstruct(autoencoder, dataset, out, observation="auto", seed=0, progress=True, data_path="", vae_path=""):
    """Encode and decode every cell of ``dataset`` (closed afterwards) into ``out``; returns ``out``.

    ``observation`` as cell_sample.py's --observation: with counts, counts are drawn for each cell's own total
    count. ``data_path`` and ``vae_path`` are recorded (their file names) in ``uns["cfdiffusion"]``.
    """
    try:
        autoencoder.check_dataset(dataset)
        observation = resolve_observation(observation, autoencoder)
        latents = autoencoder.encode_dataset(dataset, progress=progress)
        labels = {key: pd.Categorical(dataset.label_strings(key, dataset.label_codes[:, column]))
                  for column, key in enumerate(dataset.label_keys)}
        library_sizes = dataset.library_sizes() if observation == "counts" else None
        if library_sizes is not None:
            labels["library_size"] = library_sizes
    finally:
        dataset.close()
    obs = pd.DataFrame(labels, index=pd.Index([f"reconstructed_{i}" for i in range(len(latents))], name="cell"))
    uns = {"cfdiffusion": {"reconstruction_of": os.path.basename(data_path),
                           "vae_path": os.path.basename(vae_path), "observation": observation,
                           "seed": seed}}
    write_decoded_h5ad(out, autoencoder, latents, obs, uns, progress=progress,
                       library_sizes=library_sizes, seed=seed)
    return out
