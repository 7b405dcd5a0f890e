"""Training: the settings (the only defaults; the CLI flags are built from them), the shared loop
(stop, deadline, signals, logging, saving), AdamW, the diffusion trainer and the pipeline
h5ad -> latents -> trainer."""
