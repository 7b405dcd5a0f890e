#!/usr/bin/env bash
# Fidelity of sampler configurations against the faithful 1000-step DDPM (cache 5, fp32), on held-out cells
# (the demo's protocol, scripts/demo.sh): each dataset is split 80/20 (exp_script/split.py, stratified by
# label, seed 0), the autoencoder and the diffusion model are trained once on the training cells (the demo's
# recipe: the default autoencoder stopped early on its validation loss, patience AE_PATIENCE (300), cap 3,000
# steps; diffusion 8,000 steps at lr 1e-3), then every
# sampler configuration is sampled with several seeds (`--match_counts`: as many cells per type as training
# had) and scored by exp_script/evaluate.py against the held-out cells (--real heldout.h5ad --train
# train.h5ad). Datasets: the bundled Baron data and scanpy's pbmc68k_reduced (log-normalized, so an mse
# autoencoder and decoded means). Configurations are interleaved within each seed, so the sampling wall
# times (whole cell_sample.py process, model loading included) are comparable within a seed.
#
#   bash benchmarks/bench_fidelity.sh                 # outputs in checkpoint/fidelity/
#   SEEDS="0 1 2" CONFIGS="faithful default dpmpp2m_logsnr15" DATASETS=baron bash benchmarks/bench_fidelity.sh
#   BARON_DATA=R/split/train.h5ad ...   # split the training split again: its 20% are validation cells
#
# Every heavy process runs on THREADS threads (default 1: OMP_NUM_THREADS, and --threads for training).
# A run whose evaluation already exists is not sampled again (delete its folder to redo it); the models are
# trained only if their checkpoint is missing. Prints one TSV row per run (OUT/fidelity.tsv) and then, per
# configuration, mean ± sd over seeds of kNN AUC, RF AUC, SCC, CellTypist accuracy and the DE log-fold-change
# Pearson, beside the positive control (training cells vs held-out cells, the same evaluation) and the
# sampling time relative to the default (median over seeds of the per-seed ratio).
#
# Acceptance rule: a configuration is accepted when, on every dataset, its mean stays within kNN AUC +0.03,
# SCC -0.003 and CellTypist accuracy -0.02 of the faithful configuration's mean, on held-out cells.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/lib.sh
source benchmarks/lib.sh
PY=${PY:-.venv/bin/python}
OUT=${OUT:-checkpoint/fidelity}
AE_PATIENCE=${AE_PATIENCE:-300}  # 0: no early stopping, the autoencoder after its AE_STEPS steps
SEEDS=${SEEDS:-"0 1 2 3 4"}  # three seeds put the ODE solver inside the CellTypist limit on Baron, five outside
# "default": cell_sample.py's default: SDE-DPM-Solver++(2M) logsnr10 (= sde_logsnr10), with the count decoder's
# output layer in bf16 where the CPU has it (decoder_fp32: without); dpmpp2m_logsnr10 is the ODE form and ddpm50
# DDPM-50, earlier defaults (CHANGELOG.md)
CONFIGS=${CONFIGS:-"faithful default dpmpp2m_logsnr10 ddpm50 sde_logsnr15 sde_logsnr20"}
DATASETS=${DATASETS:-"baron pbmc"}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
METRICS="knn_auc rf_auc scc celltypist_accuracy de_lfc_pearson"
mkdir -p "$OUT"

flags_of() {
  case $1 in
    faithful) echo "--use_ddim False --timestep_respacing 1000 --cache_interval 5 --precision fp32" ;;
    default) echo "" ;;
    decoder_fp32) echo "--decoder_precision fp32" ;;
    dpmpp2m_logsnr10) echo "--solver dpmpp2m --timestep_respacing logsnr10" ;;
    dpmpp2m_logsnr15) echo "--solver dpmpp2m --timestep_respacing logsnr15" ;;
    dpmpp2m_logsnr20) echo "--solver dpmpp2m --timestep_respacing logsnr20" ;;
    dpmpp2m_logsnr25) echo "--solver dpmpp2m --timestep_respacing logsnr25" ;;
    sde_logsnr10) echo "--solver dpmpp2m_sde --timestep_respacing logsnr10" ;;
    sde_logsnr15) echo "--solver dpmpp2m_sde --timestep_respacing logsnr15" ;;
    sde_logsnr20) echo "--solver dpmpp2m_sde --timestep_respacing logsnr20" ;;
    ddim20) echo "--use_ddim True --timestep_respacing ddim20" ;;
    ddim50_cache1) echo "--use_ddim True --timestep_respacing ddim50 --cache_interval 1" ;;
    ddpm50) echo "--solver ddpm --timestep_respacing 50" ;;
    ddpm50_cache2) echo "--solver ddpm --timestep_respacing 50 --cache_interval 2" ;;
    ddpm50_cache5) echo "--solver ddpm --timestep_respacing 50 --cache_interval 5" ;;
    ddpm100_cache5) echo "--solver ddpm --timestep_respacing 100 --cache_interval 5" ;;
    *) echo "unknown configuration $1" >&2; exit 2 ;;
  esac
}

# per dataset: the file, its label key, the layer flags (for split-free tools), autoencoder steps,
# diffusion flags
dataset_of() {
  case $1 in
    baron) DATA=${BARON_DATA:-dataset/baron_human.h5ad}; LABEL=cell_type1; LAYER_FLAGS=""; AE_STEPS=3000
      AE_FLAGS="--num_genes 20125"; DIFFUSION_FLAGS="--num_classes 14" ;;
    pbmc) DATA="$OUT/pbmc68k_reduced.h5ad"; LABEL=bulk_labels; LAYER_FLAGS="--layer raw --input_is_log True"
      AE_STEPS=3000; AE_FLAGS="$LAYER_FLAGS"; DIFFUSION_FLAGS="$LAYER_FLAGS --label_key bulk_labels" ;;
    *) echo "unknown dataset $1" >&2; exit 2 ;;
  esac
}

prepare() {  # prepare NAME: split, then train the autoencoder and the diffusion model on the training cells
  local name=$1 dir="$OUT/$1"
  dataset_of "$name"
  if [ "$name" = pbmc ] && [ ! -f "$DATA" ]; then
    "$PY" -c "import scanpy as sc; sc.datasets.pbmc68k_reduced().write_h5ad('$DATA')"
  fi
  if [ ! -f "$dir/split/heldout.h5ad" ]; then
    "$PY" exp_script/split.py --data_dir "$DATA" --label_key "$LABEL" --out "$dir/split" --heldout_fraction 0.2 --seed 0
  fi
  if [ ! -f "$dir/diffusion/$name/model008000.pt" ]; then
    # shellcheck disable=SC2086
    "$PY" VAE/VAE_train.py --data_dir "$dir/split/train.h5ad" --decoder_label_key "$LABEL" $AE_FLAGS \
      --save_dir "$dir/autoencoder" \
      --max_steps "$AE_STEPS" --checkpoint_freq "$AE_STEPS" --early_stopping_patience "$AE_PATIENCE" \
      --progress False --threads "$THREADS"
    # shellcheck disable=SC2086
    "$PY" cell_train.py --data_dir "$dir/split/train.h5ad" $DIFFUSION_FLAGS \
      --vae_path "$(autoencoder_file "$dir/autoencoder" 0)" --model_name "$name" \
      --save_dir "$dir/diffusion" --lr_anneal_steps 8000 --save_interval 8000 --lr 1e-3 \
      --branch 0 --cache_interval 5 --non_uniform False --progress False --threads "$THREADS"
  fi
}

results="$OUT/fidelity.tsv"
printf "dataset\tconfiguration\tseed\tsample_seconds\tcells\t%s\n" "$(echo $METRICS | tr ' ' '\t')" > "$results"
for dataset in $DATASETS; do
  prepare "$dataset"
  dir="$OUT/$dataset"
  for seed in $SEEDS; do
    for config in $CONFIGS; do
      run="$dir/runs/${config}_seed$seed"
      if [ ! -f "$run/evaluation/metrics.json" ]; then
        rm -rf "$run"
        start=$EPOCHREALTIME
        eval "\"$PY\" cell_sample.py --model_path \"$dir/diffusion/$dataset/model008000.pt\" --sample_dir \"$run\" \
          --match_counts --seed $seed --progress False $(flags_of "$config")" > /dev/null
        echo "$start $EPOCHREALTIME" > "$run/sample_seconds"  # start and end of the sampling process
        # shellcheck disable=SC2086
        "$PY" exp_script/evaluate.py --real "$dir/split/heldout.h5ad" --train "$dir/split/train.h5ad" $LAYER_FLAGS \
          --label_key "$LABEL" --generated "$run/generated.h5ad" --out "$run/evaluation" --metrics $METRICS \
          --controls False --augmentation_seeds 1 --plots False --progress False > /dev/null 2> "$run/evaluation.log" \
          || { cat "$run/evaluation.log" >&2; exit 1; }  # the per-label warnings stay in evaluation.log
      fi
      "$PY" benchmarks/fidelity_table.py row "$run" "$dataset" "$config" "$seed" $METRICS | tee -a "$results"
    done
  done
done
echo
"$PY" benchmarks/fidelity_table.py summary "$results" "$OUT" $METRICS
