#!/usr/bin/env bash
# The main job on the bundled dataset, on held-out data: split (stratified, seeded, 80/20) -> autoencoder
# and diffusion trained on the training cells only -> sample as many cells per type as training had ->
# evaluate against the held-out cells (with the training cells for the novelty and usefulness checks).
# Run through `make demo` (which installs .venv first).
#
# Every run writes into its own folder, checkpoint/demo/run-YYYYmmdd-HHMMSS, and then points
# checkpoint/demo/latest at it; no run deletes or overwrites another run's files, so models trained on
# an earlier demo autoencoder keep working.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=dataset/baron_human.h5ad
ROOT=checkpoint/demo
AE_STEPS=${AE_STEPS:-3000}  # the cap; early stopping on the autoencoder's validation loss ends it sooner
AE_PATIENCE=${AE_PATIENCE:-300}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-12000}  # flat from 8,000 steps on (docs/fidelity.md, "Longer budgets")
SEED=${SEED:-0}
mkdir -p "$ROOT"
OUT="$ROOT/run-$(date -u +%Y%m%d-%H%M%S)"
if [ -e "$OUT" ]; then
  echo "error: $OUT already exists; wait a second and run again" >&2
  exit 1
fi
mkdir "$OUT"
timings="$OUT/timings.txt"
: > "$timings"

stage() {  # stage NAME COMMAND...: run a stage and record its wall time
  local name=$1; shift
  local start=$SECONDS
  echo "== $name"
  "$@"
  echo "$name $((SECONDS - start)) s" | tee -a "$timings"
}

stage split "$PY" exp_script/split.py --data_dir "$DATA" --label_key cell_type1 --out "$OUT/split" \
  --heldout_fraction 0.2 --seed "$SEED"
TRAIN="$OUT/split/train.h5ad"
HELDOUT="$OUT/split/heldout.h5ad"
# validation cells come from the training split (--val_fraction 0.1 of it); the held-out cells stay unseen
stage autoencoder "$PY" VAE/VAE_train.py --data_dir "$TRAIN" --num_genes 20125 --save_dir "$OUT/autoencoder" \
  --max_steps "$AE_STEPS" --checkpoint_freq "$AE_STEPS" --log_interval 20 --early_stopping_patience "$AE_PATIENCE"
AE="$OUT/autoencoder/model_seed=0_best.pt"  # AE_PATIENCE=0: no early stopping, the last step's model
[ "$AE_PATIENCE" -gt 0 ] || AE="$OUT/autoencoder/model_seed=0_step=$AE_STEPS.pt"
stage diffusion "$PY" cell_train.py --data_dir "$TRAIN" --vae_path "$AE" --model_name baron --save_dir "$OUT/diffusion" \
  --lr_anneal_steps "$DIFFUSION_STEPS" --save_interval "$DIFFUSION_STEPS" --lr 1e-3 --num_classes 14 \
  --branch 0 --cache_interval 5 --non_uniform False --threads "${DIFFUSION_THREADS:-1}"
# one thread: the denoiser's kernels are small; measured fastest under load and within 1.3x of the fastest
# quiet setting (README, "On a CPU")
MODEL=$(printf "%s/diffusion/baron/model%06d.pt" "$OUT" "$DIFFUSION_STEPS")
stage sampling "$PY" cell_sample.py --model_path "$MODEL" --sample_dir "$OUT/samples" --match_counts
stage evaluation "$PY" exp_script/evaluate.py --real "$HELDOUT" --train "$TRAIN" \
  --generated "$OUT/samples/generated.h5ad" --label_key cell_type1 --out "$OUT/evaluation"
ln -sfn "$(basename "$OUT")" "$ROOT/latest"
echo
echo "Stage wall times:"; cat "$timings"
echo "total $SECONDS s"
echo "Run folder: $OUT (also $ROOT/latest)"
echo "Report: $ROOT/latest/evaluation/report.md"
