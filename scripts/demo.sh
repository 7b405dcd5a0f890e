#!/usr/bin/env bash
# The main job on the bundled dataset: autoencoder -> diffusion -> sample every cell type -> evaluate.
# Run through `make demo` (which installs .venv first). Outputs go to checkpoint/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=dataset/baron_human.h5ad
OUT=checkpoint/demo
AE_STEPS=${AE_STEPS:-600}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-8000}
mkdir -p "$OUT"
timings="$OUT/timings.txt"
: > "$timings"

stage() {  # stage NAME COMMAND...: run a stage and record its wall time
  local name=$1; shift
  local start=$SECONDS
  echo "== $name"
  "$@"
  echo "$name $((SECONDS - start)) s" | tee -a "$timings"
}

rm -rf "$OUT/autoencoder" "$OUT/diffusion" "$OUT/samples" "$OUT/evaluation"
stage autoencoder "$PY" VAE/VAE_train.py --data_dir "$DATA" --num_genes 20125 --save_dir "$OUT/autoencoder" \
  --max_steps "$AE_STEPS" --checkpoint_freq "$AE_STEPS"
AE="$OUT/autoencoder/model_seed=0_step=$AE_STEPS.pt"
stage diffusion "$PY" cell_train.py --data_dir "$DATA" --vae_path "$AE" --model_name baron --save_dir "$OUT/diffusion" \
  --lr_anneal_steps "$DIFFUSION_STEPS" --save_interval "$DIFFUSION_STEPS" --lr 1e-3 --num_classes 14 \
  --branch 0 --cache_interval 5 --non_uniform False
MODEL=$(printf "%s/diffusion/baron/model%06d.pt" "$OUT" "$DIFFUSION_STEPS")
stage sampling "$PY" cell_sample.py --model_path "$MODEL" --sample_dir "$OUT/samples" --match_counts
stage evaluation "$PY" exp_script/evaluate.py --real "$DATA" --generated "$OUT/samples/generated.h5ad" \
  --label_key cell_type1 --out "$OUT/evaluation"
echo
echo "Stage wall times:"; cat "$timings"
echo "total $SECONDS s"
echo "Report: $OUT/evaluation/report.md"
