"""Gaussian diffusion with epsilon prediction, MSE training and DDPM / DDIM sampling.

Schedule constants are float64 numpy arrays; they are gathered per timestep
and cast to the dtype of the tensor they combine with, on its device.

Samplers call ``eps_fn(x, t, step_index)`` where ``t`` is a LongTensor (B,)
of the timesteps the model was trained on (see ``model_timesteps``) and
``step_index`` counts executed steps from 0 (the noisiest step).
"""

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

EpsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def _gather(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as a tensor of like's dtype/device, broadcastable against ``like``."""
    out = torch.from_numpy(values).to(device=t.device)[t].to(like.dtype)
    return out.reshape(out.shape + (1,) * (like.dim() - 1))


def _nonzero_mask(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 where t > 0 and 0 at the final step (no noise is added there)."""
    return (t != 0).to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device, dtype: torch.dtype):
    """Standard normal noise; drawn on the generator's device so seeding is reproducible."""
    if generator is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    return torch.randn(*shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _resolve_device(noise: Optional[torch.Tensor], device, generator: Optional[torch.Generator]) -> torch.device:
    if noise is not None:
        return noise.device
    if device is not None:
        return torch.device(device)
    if generator is not None:
        return generator.device
    return torch.get_default_device()


class GaussianDiffusion:
    """Forward process, epsilon-MSE loss and reverse samplers for a beta schedule."""

    def __init__(self, betas: np.ndarray, clip_bound: float = 1.0):
        betas = np.asarray(betas, dtype=np.float64)
        self.clip_bound = float(clip_bound)  # clip_denoised clamps predicted x0 to [-clip_bound, clip_bound]
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # "Fixed large" variance: betas, with the first entry taken from the posterior
        # (the posterior variance at t=0 is zero, whose log is undefined).
        if self.num_timesteps > 1:
            self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        else:
            self.fixed_large_log_variance = np.log(betas)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps to feed the model for internal indices ``t`` (identity here)."""
        return t

    # Forward process and training ----------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def sample_timesteps(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Uniform timesteps in [0, num_timesteps) as a LongTensor (batch,)."""
        if generator is None:
            return torch.randint(0, self.num_timesteps, (batch,), device=device)
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=generator.device).to(device)

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-sample MSE (B,) between the true noise and ``model(x_t, t, **model_kwargs)``."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        eps = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        return (eps - noise).pow(2).flatten(1).mean(dim=1)

    # Reverse process ------------------------------------------------------------------

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _gather(self.posterior_mean_coef1, t, x_t) * x0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t

    def _predict_x0(self, eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, step_index: int, clip_denoised: bool):
        eps = eps_fn(x, self.model_timesteps(t), step_index)
        x0 = self.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-self.clip_bound, self.clip_bound)
        return x0, eps

    def p_sample(
        self,
        eps_fn: EpsFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_index: int,
        clip_denoised: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """One DDPM ancestral step x_t -> x_{t-1} with fixed-large variance."""
        x0, _ = self._predict_x0(eps_fn, x, t, step_index, clip_denoised)
        mean = self.q_posterior_mean(x0, x, t)
        std = torch.exp(0.5 * _gather(self.fixed_large_log_variance, t, x))
        return mean + _nonzero_mask(t, x) * std * _randn(x.shape, generator, x.device, x.dtype)

    def ddim_sample(
        self,
        eps_fn: EpsFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_index: int,
        eta: float = 0.0,
        clip_denoised: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """One DDIM step x_t -> x_{t-1}; eta=0 is deterministic."""
        x0, eps = self._predict_x0(eps_fn, x, t, step_index, clip_denoised)
        if clip_denoised:
            eps = self.predict_eps_from_x0(x, t, x0)
        alpha_bar = _gather(self.alphas_cumprod, t, x)
        alpha_bar_prev = _gather(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta == 0:
            return mean
        return mean + _nonzero_mask(t, x) * sigma * _randn(x.shape, generator, x.device, x.dtype)

    def _sample_loop(self, step, shape, noise, device, generator, progress, on_step) -> torch.Tensor:
        device = _resolve_device(noise, device, generator)
        x = noise if noise is not None else _randn(shape, generator, device, torch.float32)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(x.shape)} does not match requested shape {tuple(shape)}")
        timesteps = range(self.num_timesteps - 1, -1, -1)
        for step_index, timestep in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
            t = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
            x = step(x, t, step_index)
            if on_step is not None:
                on_step(step_index, timestep, x)
        return x

    @torch.no_grad()
    def p_sample_loop(
        self,
        eps_fn: EpsFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        clip_denoised: bool = False,
        progress: bool = False,
        on_step: Optional[StepCallback] = None,
        device=None,
    ) -> torch.Tensor:
        """DDPM ancestral sampling from x_T = noise (drawn from ``generator`` if not given).

        ``on_step(step_index, timestep, x)`` is called after every step with the
        new sample; ``timestep`` is this diffusion's (possibly respaced) index.
        """

        def step(x, t, step_index):
            return self.p_sample(eps_fn, x, t, step_index, clip_denoised, generator)

        return self._sample_loop(step, shape, noise, device, generator, progress, on_step)

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        eps_fn: EpsFn,
        shape: Sequence[int],
        eta: float = 0.0,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        clip_denoised: bool = False,
        progress: bool = False,
        on_step: Optional[StepCallback] = None,
        device=None,
    ) -> torch.Tensor:
        """DDIM sampling; same arguments as ``p_sample_loop`` plus ``eta``."""

        def step(x, t, step_index):
            return self.ddim_sample(eps_fn, x, t, step_index, eta, clip_denoised, generator)

        return self._sample_loop(step, shape, noise, device, generator, progress, on_step)

    # DPM-Solver++ (2M) ---------------------------------------------------------------------------

    def dpm_solver_coefficients(self):
        """(alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) of every step as float64 arrays, where
        x_t = alpha_t x_0 + sigma_t eps."""
        alpha = np.sqrt(self.alphas_cumprod)
        sigma = np.sqrt(1.0 - self.alphas_cumprod)
        return alpha, sigma, np.log(alpha) - np.log(sigma)

    def log_snr_spaced_timesteps(self, count: int) -> list:
        """``count`` distinct timesteps of this process, from 0 to the last, evenly spaced in log-SNR
        (the step placement DPM-Solver is designed for; on the linear schedule, evenly spaced timesteps
        leave one step for the log-SNR range 1 -> 4.6 near the data, where the fine structure is)."""
        if not 2 <= count <= self.num_timesteps:
            raise ValueError(f"log-SNR spacing needs 2 to {self.num_timesteps} steps, got {count}")
        _, _, log_snr = self.dpm_solver_coefficients()
        targets = np.linspace(log_snr[0], log_snr[-1], count)
        steps = np.rint(np.interp(-targets, -log_snr, np.arange(self.num_timesteps))).astype(np.int64)
        for k in range(1, count):  # distinct: at least one step apart, and room left for the rest
            steps[k] = max(steps[k], steps[k - 1] + 1)
        for k in range(count - 1, -1, -1):
            steps[k] = min(steps[k], self.num_timesteps - count + k)
        return steps.tolist()

    @torch.no_grad()
    def dpm_solver_sample_loop(
        self,
        eps_fn: EpsFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        clip_denoised: bool = False,
        progress: bool = False,
        on_step: Optional[StepCallback] = None,
        device=None,
        stochastic: bool = False,
    ) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022, multistep, data-prediction form) on the probability-flow ODE.

        One ``eps_fn`` evaluation per step, as DDIM: at step t the (guided) noise prediction gives the
        data prediction D_t, and x moves to step t - 1 by the exact exponential integrator of the ODE,
        x_{t-1} = (sigma_{t-1} / sigma_t) x_t + alpha_{t-1} (1 - e^{-h}) D with h = lambda_{t-1} - lambda_t,
        where D is D_t on the first step (DDIM) and afterwards the second-order extrapolation
        (1 + 1 / 2r) D_t - (1 / 2r) D_prev with r = h_prev / h. The update to step 0 stays first order
        (its log-SNR step is several times the previous one on the linear schedule, where extrapolating
        from D_prev overshoots: the reference solver's "lower order final"), and the last evaluation
        (t = 0) returns D_0, as DDIM does. Deterministic: ``generator`` is not used by this form.

        ``stochastic`` True is SDE-DPM-Solver++(2M) (the same paper): the same data predictions D integrate
        the reverse diffusion SDE instead, x_{t-1} = (sigma_{t-1} / sigma_t) e^{-h} x_t + alpha_{t-1} (1 - e^{-2h}) D
        + sigma_{t-1} sqrt(1 - e^{-2h}) z, with fresh Gaussian noise z from ``generator`` at every update (as
        ancestral DDPM draws it): part of each step's error is forgotten instead of carried to the end.
        """
        alpha, sigma, log_snr = self.dpm_solver_coefficients()
        previous = {}  # the last data prediction and its step length in log-SNR

        def step(x, t, step_index):
            index = int(t[0])
            x0, _ = self._predict_x0(eps_fn, x, t, step_index, clip_denoised)
            if index == 0:
                return x0
            h = float(log_snr[index - 1] - log_snr[index])
            data = x0
            if previous and index > 1:  # the last update (to step 0) stays first order
                half_inverse_ratio = 0.5 * h / previous["h"]
                data = (1 + half_inverse_ratio) * x0 - half_inverse_ratio * previous["x0"]
            previous.update(x0=x0, h=h)
            if not stochastic:
                return float(sigma[index - 1] / sigma[index]) * x - float(alpha[index - 1] * np.expm1(-h)) * data
            kept = -np.expm1(-2.0 * h)  # 1 - e^{-2h}
            z = _randn(x.shape, generator, x.device, x.dtype)
            return (float(sigma[index - 1] / sigma[index] * np.exp(-h)) * x + float(alpha[index - 1] * kept) * data
                    + float(sigma[index - 1] * np.sqrt(kept)) * z)

        return self._sample_loop(step, shape, noise, device, generator, progress, on_step)
