"""Evaluation of generated cells: metrics library, orchestration with plots and report, notebooks."""
