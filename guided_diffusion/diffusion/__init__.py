"""The diffusion model itself: named noise schedules, the Gaussian process and its reverse loops
(DDPM, DDIM, DPM-Solver++), respacing, classifier-free guidance, the MLP denoiser and its feature cache."""
