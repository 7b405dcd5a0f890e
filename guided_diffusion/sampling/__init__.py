"""Sampling: the settings, the condition plan, the reverse loop, the streamed h5ad writer and the
pipeline checkpoint -> conditions -> latents -> decoded, labelled h5ad (``pipeline.sample_cells``)."""
