"""The evaluation library: what the scripts of exp_script/ (evaluate.py, augment.py, gap_analysis.py,
guidance_sweep.py, unseen_combination.py, reconstruct.py, split.py, choose_autoencoder.py) and exp_script/api.py
run. It imports nothing
from those scripts. The package itself imports none of its modules: import the one you need.

=========================  ==========================================================================
module                     owns
=========================  ==========================================================================
pipeline                   evaluate(): the evaluation run end to end (metrics.json, report.md, plots);
                           re-exports the notebooks' API
settings                   the metric catalogue, the compared sections, EvaluationSettings, progress lines
inputs                     reading and checking the evaluation's real, generated and training cells;
                           json_ready; read_set (one file's cells as a CellSet, for the gap analysis and
                           the benchmarks)
heldout_split              the label-stratified training / held-out split of an h5ad (split.py)
preparation                the split of the real cells, the compared sets, CellTypist, reference markers
controls                   the negative controls (memorizer, collapsed) and log_normalize
features                   label-stratified splits and subsamples; FeatureSpace (variable genes, PCA)
metrics                    every metric on plain arrays: gene-level, MMD, LISI, two-sample classifiers
                           and the one knn_auc, CellTypist, markers; the gap analysis' separability,
                           latent moments and observation-model statistics
comparison                 every selected metric for every compared set against the reference half
de_fidelity                differential-expression fidelity (log-fold changes, top-gene precision)
novelty                    distances of generated cells to their nearest training cell
usefulness                 train-on-synthetic and rare-type augmentation checks
label_classifier           the one logistic-regression pipeline; the guidance tools' label classifier
guidance_inputs            reading real and generated cells for the guidance tools; gene alignment
unseen_guidance            unseen combinations: the donor calls and realism of their cells; choosing
                           their guidance weights on validation combinations (the rule, the record)
plots                      the evaluation's figures
report                     the evaluation report (report.md) and the notebooks' tables
gap_analysis_report        the gap analysis' report (gap_analysis.md)
reconstruction             encode and decode real cells into an h5ad (the autoencoder's ceiling)
autoencoder_choice         choosing the autoencoder's recipe on validation cells (choose_autoencoder.py)
=========================  ==========================================================================
"""
