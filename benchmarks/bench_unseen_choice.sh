#!/usr/bin/env bash
# Unseen-combination weights chosen per checkpoint on a validation combination, judged on another: a two-key model
# (cell_type1 x donor) is trained without both CHOOSE and JUDGE (type:donor); exp_script/guidance_sweep.py
# --unseen_weights compares CANDIDATES on CHOOSE only and records the chosen weights in the checkpoint
# (--record True); then the sampler, at its defaults (so with the recorded weights), generates JUDGE and the
# type's seen combinations, scored by exp_script/unseen_combination.py score; CHOOSE is scored the same way.
#
#   bash benchmarks/bench_unseen_choice.sh                         # seeds 0 1
#   SEEDS=0 ROOT=checkpoint/unseen_choice bash benchmarks/bench_unseen_choice.sh
#   AE_FLAGS="--decoder_label_key cell_type1,donor" ROOT=checkpoint/unseen_dec2 bash benchmarks/bench_unseen_choice.sh
#
# FIXED (default "2 3 4") also samples and scores both combinations with --unseen_guide_w cell_type1=0.5,donor=W on
# the same models, for comparison with the recorded choice. INTERVAL (default: the sampler's, 0,0.5) is the
# --unseen_guidance_interval of the sweep and of every sample (0,1: guidance at every step).
# Results: $ROOT/seed<S>/{sweep/unseen_sweep.md, judge/score, choose/score, judge_donorW/score, choose_donorW/score};
# the table (mean ± sd over seeds, one row per scored combination and setting) is printed by
# benchmarks/unseen_summary.py at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/lib.sh
source benchmarks/lib.sh
PY=${PY:-.venv/bin/python}
DATA=${DATA:-dataset/baron_human.h5ad}
ROOT=${ROOT:-checkpoint/unseen_choice}
CHOOSE=${CHOOSE:-beta:human4}
JUDGE=${JUDGE:-alpha:human2}
SEEDS=${SEEDS:-"0 1"}
AE_STEPS=${AE_STEPS:-3000}  # the cap; the autoencoder stops early on its validation loss (AE_PATIENCE; 0: off)
AE_PATIENCE=${AE_PATIENCE:-300}
AE_FLAGS=${AE_FLAGS:-}  # more autoencoder flags, e.g. "--decoder_label_key cell_type1,donor"
DIFFUSION_STEPS=${DIFFUSION_STEPS:-3000}
THREADS=${THREADS:-1}
FIXED=${FIXED:-"2 3 4"}
NUM=${NUM:-100}
INTERVAL=${INTERVAL:-}
INTERVAL_FLAGS=(); [ -n "$INTERVAL" ] && INTERVAL_FLAGS=(--unseen_guidance_interval "$INTERVAL")
CANDIDATES=${CANDIDATES:-"cell_type1=0.5,donor=1 cell_type1=0.5,donor=2 cell_type1=0.5,donor=3 cell_type1=0.5,donor=4 cell_type1=0.5,donor=6"}
export OMP_NUM_THREADS=$THREADS
mkdir -p "$ROOT"
if [ ! -f "$ROOT/train.h5ad" ]; then
  "$PY" exp_script/unseen_combination.py exclude --data "$DATA" --cell_type "${CHOOSE%%:*}" --donor "${CHOOSE##*:}" \
    --out "$ROOT/train_without_choose.h5ad"
  "$PY" exp_script/unseen_combination.py exclude --data "$ROOT/train_without_choose.h5ad" --cell_type "${JUDGE%%:*}" \
    --donor "${JUDGE##*:}" --out "$ROOT/train.h5ad"
  rm "$ROOT/train_without_choose.h5ad"
fi
for seed in $SEEDS; do
  run="$ROOT/seed$seed"
  model="$run/diffusion/unseen/model$(printf %06d "$DIFFUSION_STEPS").pt"
  if [ ! -f "$model" ]; then
    # shellcheck disable=SC2086
    "$PY" VAE/VAE_train.py --data_dir "$ROOT/train.h5ad" --num_genes 20125 --save_dir "$run/autoencoder" \
      --max_steps "$AE_STEPS" --checkpoint_freq "$AE_STEPS" --early_stopping_patience "$AE_PATIENCE" --seed "$seed" \
      --threads "$THREADS" --progress False $AE_FLAGS
    "$PY" cell_train.py --data_dir "$ROOT/train.h5ad" --vae_path "$(autoencoder_file "$run/autoencoder" "$seed")" \
      --label_key cell_type1 --label_key donor --model_name unseen --save_dir "$run/diffusion" \
      --lr_anneal_steps "$DIFFUSION_STEPS" --save_interval "$DIFFUSION_STEPS" --lr 1e-3 --seed "$seed" \
      --threads "$THREADS"
  fi
  # shellcheck disable=SC2086
  "$PY" exp_script/guidance_sweep.py --model_path "$model" --validation "$DATA" --out "$run/sweep" \
    --unseen_weights $CANDIDATES --unseen_condition "cell_type1=${CHOOSE%%:*},donor=${CHOOSE##*:}" \
    --seeds "$seed" --max_per_condition "$NUM" --record True "${INTERVAL_FLAGS[@]}"
  for role in choose judge; do
    combo=$CHOOSE; [ "$role" = judge ] && combo=$JUDGE
    type=${combo%%:*}; donor=${combo##*:}
    for setting in recorded $FIXED; do  # recorded: the sampler's defaults, so the weights the sweep recorded
      out="$run/$role"; flags=()
      if [ "$setting" != recorded ]; then out="$run/${role}_donor$setting"; flags=(--unseen_guide_w "cell_type1=0.5,donor=$setting"); fi
      [ -f "$out/score/unseen_combination.json" ] && continue
      sample_and_score "$model" "$out" "$type" "$donor" "$seed" "${flags[@]}" "${INTERVAL_FLAGS[@]}"
    done
  done
done
"$PY" benchmarks/unseen_summary.py "$ROOT"
