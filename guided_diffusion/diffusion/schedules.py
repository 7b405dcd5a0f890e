"""Named noise schedules, in one place: a schedule is chosen by name, recorded by name in the
checkpoint, and rebuilt from that name by the sampler (:func:`get_named_beta_schedule`)."""
import numpy as np

# the number of steps of the training schedule (cell_train.py); the sampler uses the count in the checkpoint
DIFFUSION_STEPS = 1000
SCHEDULES = ("linear",)
NOISE_SCHEDULE = "linear"  # the schedule cell_train.py trains with


def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """Linear betas from Ho et al., rescaled so any T spans the same noise range."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def get_named_beta_schedule(name, num_timesteps=DIFFUSION_STEPS):
    """The betas of the schedule called ``name`` over ``num_timesteps`` steps."""
    if name == "linear":
        return linear_beta_schedule(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; known: {', '.join(SCHEDULES)}")
