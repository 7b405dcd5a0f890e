#!/usr/bin/env bash
# Fidelity of sampler configurations against the faithful 1000-step DDPM (cache 5), on the bundled Baron
# data and on scanpy's pbmc68k_reduced (log-normalized, mse autoencoder). Trains the models first (the
# demo's recipe; ~8 min for Baron, ~10 min for pbmc on 2 cores), then samples every configuration with
# several seeds and prints SCC, kNN AUC and CellTypist accuracy per run and their means per configuration.
#
#   bash benchmarks/bench_fidelity.sh                 # outputs in checkpoint/fidelity/
#   SEEDS="0 1 2" CONFIGS="faithful default" bash benchmarks/bench_fidelity.sh
#
# The default is accepted when, on both datasets, its mean stays within SCC -0.003, kNN AUC +0.03 and
# CellTypist accuracy -0.02 of the faithful configuration's mean.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-checkpoint/fidelity}
SEEDS=${SEEDS:-"0 1 2"}
CONFIGS=${CONFIGS:-"faithful default ddpm50_cache5 ddpm50_cache2 ddpm100_cache5 ddim50_cache1"}
mkdir -p "$OUT"

flags_of() {
  case $1 in
    faithful) echo "--use_ddim False --timestep_respacing 1000 --cache_interval 5 --precision fp32" ;;
    default) echo "" ;;
    ddpm50_cache5) echo "--timestep_respacing 50 --cache_interval 5" ;;
    ddpm50_cache2) echo "--timestep_respacing 50 --cache_interval 2" ;;
    ddpm100_cache5) echo "--timestep_respacing 100 --cache_interval 5" ;;
    ddim50_cache1) echo "--use_ddim True --timestep_respacing ddim50 --cache_interval 1" ;;
    *) echo "unknown configuration $1" >&2; exit 2 ;;
  esac
}

train() {  # train NAME DATA AE_STEPS LOADER_FLAGS...
  local name=$1 data=$2 ae_steps=$3; shift 3
  if [ ! -f "$OUT/$name/diffusion/$name/model008000.pt" ]; then
    "$PY" VAE/VAE_train.py --data_dir "$data" "$@" --save_dir "$OUT/$name/autoencoder" --max_steps "$ae_steps" \
      --checkpoint_freq "$ae_steps" --progress False
    "$PY" cell_train.py --data_dir "$data" "$@" ${LABEL_FLAGS:-} \
      --vae_path "$OUT/$name/autoencoder/model_seed=0_step=$ae_steps.pt" --model_name "$name" \
      --save_dir "$OUT/$name/diffusion" --lr_anneal_steps 8000 --save_interval 8000 --lr 1e-3 \
      --branch 0 --cache_interval 5 --non_uniform False --progress False
  fi
}

if [ ! -f "$OUT/pbmc68k_reduced.h5ad" ]; then
  "$PY" -c "import scanpy as sc; sc.datasets.pbmc68k_reduced().write_h5ad('$OUT/pbmc68k_reduced.h5ad')"
fi
train baron dataset/baron_human.h5ad 600
LABEL_FLAGS="--label_key bulk_labels" train pbmc "$OUT/pbmc68k_reduced.h5ad" 3000 --layer raw --input_is_log True

results="$OUT/fidelity.tsv"
printf "dataset\tconfiguration\tseed\tscc\tknn_auc\tcelltypist_accuracy\n" > "$results"
for dataset in baron pbmc; do
  if [ "$dataset" = baron ]; then real=dataset/baron_human.h5ad; eval_flags=""
  else real="$OUT/pbmc68k_reduced.h5ad"; eval_flags="--layer raw --input_is_log True --label_key bulk_labels"; fi
  for config in $CONFIGS; do
    for seed in $SEEDS; do
      run="$OUT/$dataset/runs/${config}_seed$seed"
      "$PY" cell_sample.py --model_path "$OUT/$dataset/diffusion/$dataset/model008000.pt" --sample_dir "$run" \
        --match_counts --seed "$seed" --progress False $(flags_of "$config") > /dev/null
      # shellcheck disable=SC2086
      "$PY" exp_script/evaluate.py --real "$real" $eval_flags --generated "$run/generated.h5ad" --out "$run/evaluation" \
        --metrics scc knn_auc celltypist_accuracy --plots False --progress False > /dev/null
      "$PY" -c "
import json; m = json.load(open('$run/evaluation/metrics.json'))['generated']['overall']
print('\t'.join(['$dataset', '$config', '$seed'] + ['%.4f' % m[k] for k in ('scc', 'knn_auc', 'celltypist_accuracy')]))
" | tee -a "$results"
    done
  done
done
echo
"$PY" -c "
import pandas as pd
table = pd.read_csv('$results', sep='\t')
means = table.groupby(['dataset', 'configuration'])[['scc', 'knn_auc', 'celltypist_accuracy']].mean()
faithful = means.xs('faithful', level='configuration')
delta = means - faithful.reindex(means.index, level='dataset').to_numpy()
print('mean over seeds'); print(means.round(4).to_string())
print(); print('difference to faithful (limits: scc >= -0.003, knn_auc <= +0.03, celltypist >= -0.02)')
print(delta.round(4).to_string())
"
