"""The sampler's random streams, each derived from (--seed, stream, index) so that no stream depends on
batching, on the number of processes or on another stream.

| stream            | index            | drives                                             |
| ----------------- | ---------------- | -------------------------------------------------- |
| CONDITION_NOISE   | condition number | the starting noise x_T of that condition's cells   |
| STEP_NOISE        | batch number     | the noise of every DDPM/DDIM step of that batch     |
| COUNT_DRAWS       | decode chunk     | the negative-binomial count draws of that chunk    |
| LIBRARY_SIZES     | condition number | the library sizes drawn for that condition's cells |

The numbers are arbitrary but fixed: changing one changes every generated file for a given seed.
"""
import numpy as np
import torch

CONDITION_NOISE = 0  # the original stream: SeedSequence([seed, condition_index])
STEP_NOISE = 1_000_003
COUNT_DRAWS = 2_000_003
LIBRARY_SIZES = 3_000_017


def stream_seed(seed, stream, index):
    """A 32-bit seed for ``index`` of ``stream``, a pure function of (seed, stream, index)."""
    entropy = [seed, index] if stream == CONDITION_NOISE else [seed, stream, index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def torch_generator(seed, stream, index, device="cpu"):
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream, index))


def numpy_generator(seed, stream, index):
    return np.random.default_rng([seed, stream, index])
