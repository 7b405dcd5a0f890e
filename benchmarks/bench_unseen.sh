#!/usr/bin/env bash
# Unseen condition combinations on the bundled data: for each held-out (cell type, donor) combination and
# training seed, train a two-key model (cell_type1 x donor) without that combination (the demo's CPU recipe
# at a smaller budget), generate the held-out combination and the type's seen ones with the sampler's
# default settings and with the given extra settings, and score each with exp_script/unseen_combination.py.
#
#   bash benchmarks/bench_unseen.sh                      # both combinations, seeds 0 1
#   COMBOS="beta:human4" SEEDS="0" bash benchmarks/bench_unseen.sh
#   STAGE=sample bash benchmarks/bench_unseen.sh         # reuse the trained models, sample and score again
#   AE_FLAGS="--latent_dim 20" ROOT=checkpoint/bench_unseen_l20 bash benchmarks/bench_unseen.sh   # another autoencoder
#
# Results: $ROOT/<type>_<donor>/seed<S>/<setting>/score/unseen_combination.json; the summary table
# (mean +- sd over seeds) is printed by benchmarks/unseen_summary.py at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/lib.sh
source benchmarks/lib.sh
PY=${PY:-.venv/bin/python}
DATA=${DATA:-dataset/baron_human.h5ad}
ROOT=${ROOT:-checkpoint/bench_unseen}
COMBOS=${COMBOS:-"beta:human4 alpha:human2"}
SEEDS=${SEEDS:-"0 1"}
AE_STEPS=${AE_STEPS:-3000}  # the cap; the autoencoder stops early on its validation loss (AE_PATIENCE; 0: off)
AE_PATIENCE=${AE_PATIENCE:-300}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-3000}
THREADS=${THREADS:-1}
STAGE=${STAGE:-all}
NUM=${NUM:-100}
AE_FLAGS=${AE_FLAGS:-}  # extra autoencoder flags, e.g. "--hidden_dims 1024 1024 1024 --latent_dim 128" (the paper's)
# name=flags; "default" is the sampler with no guidance flags
SETTINGS=${SETTINGS:-"default=|nested_w0.5=--guidance_form nested"}

for combo in $COMBOS; do
  type=${combo%%:*}; donor=${combo##*:}
  dir="$ROOT/${type}_${donor}"
  mkdir -p "$dir"
  [ -f "$dir/train.h5ad" ] || "$PY" exp_script/unseen_combination.py exclude --data "$DATA" --cell_type "$type" \
    --donor "$donor" --out "$dir/train.h5ad"
  for seed in $SEEDS; do
    run="$dir/seed$seed"
    if [ "$STAGE" = all ] && [ ! -f "$run/diffusion/unseen/model$(printf %06d "$DIFFUSION_STEPS").pt" ]; then
      "$PY" VAE/VAE_train.py --data_dir "$dir/train.h5ad" --num_genes 20125 --save_dir "$run/autoencoder" \
        --max_steps "$AE_STEPS" --checkpoint_freq "$AE_STEPS" --early_stopping_patience "$AE_PATIENCE" --seed "$seed" --threads "$THREADS" $AE_FLAGS
      "$PY" cell_train.py --data_dir "$dir/train.h5ad" --vae_path "$(autoencoder_file "$run/autoencoder" "$seed")" \
        --label_key cell_type1 --label_key donor --model_name unseen --save_dir "$run/diffusion" \
        --lr_anneal_steps "$DIFFUSION_STEPS" --save_interval "$DIFFUSION_STEPS" --lr 1e-3 --seed "$seed" \
        --threads "$THREADS"
    fi
    model="$run/diffusion/unseen/model$(printf %06d "$DIFFUSION_STEPS").pt"
    IFS='|' read -ra settings <<< "$SETTINGS"
    for setting in "${settings[@]}"; do
      name=${setting%%=*}; flags=${setting#*=}
      # shellcheck disable=SC2086
      sample_and_score "$model" "$run/$name" "$type" "$donor" "$seed" $flags
    done
  done
done
"$PY" benchmarks/unseen_summary.py "$ROOT"
