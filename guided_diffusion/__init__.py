from guided_diffusion.core.threads import prefer_passive_waiting

prefer_passive_waiting()  # before anything below imports torch (OpenMP reads it once, at load)
