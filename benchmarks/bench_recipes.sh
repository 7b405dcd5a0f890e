#!/usr/bin/env bash
# Training recipes on the held-out protocol, several training seeds: the demo's split (80/20, split seed 0,
# the same held-out cells for every run) -> per seed one autoencoder run (AE_STEPS steps, the lowest-validation-
# loss weights kept in model_seed=S_best.pt; validation cells come from the training split only) -> per recipe a
# diffusion run, sampling (as many cells per type as training had) and the evaluation against the held-out
# cells beside the positive control (training cells vs held-out). Prints mean ± sd per recipe.
#
#   SEEDS="0 1 2" RECIPES="last:8000 best:8000 best:16000" bash benchmarks/bench_recipes.sh checkpoint/recipes
#
# A recipe is [VARIANT-]AUTOENCODER:DIFFUSION_STEPS; AUTOENCODER is `last` (the model after AE_STEPS steps, today's
# demo) or `best` (early stopping: the weights of the lowest validation loss; an early-stopped run with patience P
# would have stopped at best step + P, which the summary reports as the autoencoder steps that recipe needs);
# VARIANT (optional) trains its own autoencoder with extra flags: noise02 / noise05 = --latent_noise 0.02 / 0.05, or one
# named in VARIANTS ("name:flags|name:flags", e.g. VARIANTS="kl03:--kl_weight 0.3|small:--hidden_dims 256 256"; {seed} in
# the flags is the run's training seed, e.g. "atlas:--init_from P/pretrain_seed{seed}/model_seed={seed}_best.pt"). DATASET
# is baron (dataset/baron_human.h5ad, cell_type1) or pbmc3k (dataset/pbmc3k.h5ad, cell_type), or any other name with
# DATA_FILE and LABEL_KEY set (e.g. DATASET=cbmc DATA_FILE=checkpoint/cbmc/cbmc.h5ad LABEL_KEY=cell_type); the autoencoder's
# decoder reads that label (--decoder_label_key; a variant's "--decoder_label_key none" trains one that reads
# none, as every autoencoder did before the flag existed). Every stage is
# pinned to THREADS threads (default 1); stage wall times go to OUT/seed*/times.tsv. Runs already done are reused.
# GAP=1 also runs exp_script/gap_analysis.py per run (decoded training latents and held-out reconstructions).
# SAMPLER_FLAGS (default: the sampler's defaults) are passed to cell_sample.py, e.g. "--timestep_respacing 50";
# DIFFUSION_FLAGS to cell_train.py, e.g. "--dropout 0.1" (use an OUT of its own: runs are reused by recipe name).
# BARON_DATA / PBMC3K_DATA replace the dataset file, e.g. R/split/train.h5ad: its 20% "held-out" cells are then
# validation cells inside that training split, for choices.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/lib.sh
source benchmarks/lib.sh
PY=${PY:-.venv/bin/python}
OUT=${1:-checkpoint/recipes}
SEEDS=${SEEDS:-"0 1 2"}
RECIPES=${RECIPES:-"last:8000 best:8000 best:16000"}
AE_STEPS=${AE_STEPS:-600}
PATIENCE=${PATIENCE:-150}
STOP_PATIENCE=${STOP_PATIENCE:-$AE_STEPS}  # the autoencoder runs stop after this many steps without improvement
THREADS=${THREADS:-1}
SAMPLER_FLAGS=${SAMPLER_FLAGS:-}
DIFFUSION_FLAGS=${DIFFUSION_FLAGS:-}
DATASET=${DATASET:-baron}
VARIANTS=${VARIANTS:-}
case $DATASET in
  baron) DATA=${BARON_DATA:-dataset/baron_human.h5ad}; LABEL=cell_type1 ;;
  pbmc3k) DATA=${PBMC3K_DATA:-dataset/pbmc3k.h5ad}; LABEL=cell_type ;;
  *) if [ -z "${DATA_FILE:-}" ] || [ -z "${LABEL_KEY:-}" ]; then
       echo "error: DATASET $DATASET is not bundled (baron, pbmc3k): set DATA_FILE and LABEL_KEY" >&2; exit 2
     fi
     DATA=$DATA_FILE; LABEL=$LABEL_KEY ;;
esac
variant_flags() {  # variant_flags NAME: the autoencoder flags of a variant named in VARIANTS
  local entry
  IFS='|' read -ra entries <<< "$VARIANTS"
  for entry in "${entries[@]}"; do
    if [ "${entry%%:*}" = "$1" ]; then echo "${entry#*:}"; return 0; fi
  done
  return 1
}
export OMP_NUM_THREADS=$THREADS
mkdir -p "$OUT"


if [ ! -f "$OUT/split/heldout.h5ad" ]; then
  "$PY" exp_script/split.py --data_dir "$DATA" --label_key "$LABEL" --out "$OUT/split" \
    --heldout_fraction 0.2 --seed 0
fi
for seed in $SEEDS; do
  run="$OUT/seed$seed"
  mkdir -p "$run"
  times="$run/times.tsv"
  touch "$times"
  for recipe in $RECIPES; do
    choice=${recipe%%:*}; steps=${recipe##*:}
    variant=""; ae_flags=""
    if [[ $choice == *-* ]]; then variant=${choice%%-*}; choice=${choice#*-}; fi
    case $variant in
      "") ;;
      noise02) ae_flags="--latent_noise 0.02" ;;
      noise05) ae_flags="--latent_noise 0.05" ;;
      *) ae_flags=$(variant_flags "$variant") || { echo "error: recipe $recipe: unknown autoencoder variant $variant" >&2; exit 2; } ;;
    esac
    ae_flags=${ae_flags//\{seed\}/$seed}  # {seed} in a variant's flags: this run's training seed
    ae_dir="$run/autoencoder${variant:+_$variant}"
    if [ ! -f "$ae_dir/model_seed=${seed}_best.pt" ]; then
      # shellcheck disable=SC2086
      timed "$times" "autoencoder${variant:+ $variant}" "$PY" VAE/VAE_train.py --data_dir "$OUT/split/train.h5ad" \
        --save_dir "$ae_dir" --max_steps "$AE_STEPS" --checkpoint_freq "$AE_STEPS" --log_interval 20 \
        --early_stopping_patience "$STOP_PATIENCE" --seed "$seed" --threads "$THREADS" --progress False --overwrite True \
        --decoder_label_key "$LABEL" $ae_flags
    fi
    case $choice in
      last) ae="$ae_dir/model_seed=${seed}_step=$AE_STEPS.pt" ;;
      best) ae="$ae_dir/model_seed=${seed}_best.pt" ;;
      *) echo "error: recipe $recipe: the autoencoder is 'last' or 'best'" >&2; exit 2 ;;
    esac
    choice="${variant:+$variant-}$choice"
    folder="$run/${choice}_d$steps"
    model=$(printf "%s/diffusion/%s/model%06d.pt" "$folder" "$DATASET" "$steps")
    if [ ! -f "$model" ]; then
      # shellcheck disable=SC2086
      timed "$times" "diffusion ${choice}_d$steps" "$PY" cell_train.py --data_dir "$OUT/split/train.h5ad" \
        --label_key "$LABEL" --vae_path "$ae" --model_name "$DATASET" --save_dir "$folder/diffusion" --lr_anneal_steps "$steps" \
        --save_interval "$steps" --lr 1e-3 --seed "$seed" --threads "$THREADS" --progress False --overwrite True \
        $DIFFUSION_FLAGS
    fi
    if [ ! -f "$folder/evaluation/metrics.json" ]; then
      rm -rf "$folder/samples"
      # shellcheck disable=SC2086
      "$PY" cell_sample.py --model_path "$model" --sample_dir "$folder/samples" --match_counts --seed "$seed" \
        --progress False $SAMPLER_FLAGS > /dev/null
      timed "$times" "evaluation ${choice}_d$steps" "$PY" exp_script/evaluate.py --real "$OUT/split/heldout.h5ad" \
        --train "$OUT/split/train.h5ad" --generated "$folder/samples/generated.h5ad" --label_key "$LABEL" \
        --out "$folder/evaluation" --seed "$seed" --plots False --progress False > /dev/null
    fi
    if [ -n "${GAP:-}" ] && [ ! -f "$folder/gap/gap_analysis.json" ]; then  # GAP=1: also the gap analysis
      timed "$times" "gap ${choice}_d$steps" "$PY" exp_script/gap_analysis.py --train "$OUT/split/train.h5ad" \
        --heldout "$OUT/split/heldout.h5ad" --vae_path "$ae" --samples "$folder/samples" --label_key "$LABEL" \
        --out "$folder/gap" --seed "$seed" --threads "$THREADS" --progress False > /dev/null
    fi
  done
done
"$PY" -m benchmarks.recipe_summary "$OUT" --patience "$PATIENCE" --ae_steps "$AE_STEPS"
