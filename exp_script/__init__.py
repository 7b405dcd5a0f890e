"""Evaluation of generated cells. The command-line scripts sit at the top (evaluate.py, split.py, augment.py,
gap_analysis.py, guidance_sweep.py, unseen_combination.py, reconstruct.py), with the Python API (api.py) and
the notebooks; the library they share is the package exp_script.evaluation."""
