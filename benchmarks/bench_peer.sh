#!/usr/bin/env bash
# The scVI peer row of the fidelity benchmark, on the held-out protocol our rows use (bench_recipes.sh): each dataset
# is split 80/20 (exp_script/split.py --heldout_fraction 0.2 --seed 0, stratified by label), scVI is trained on the
# training cells per seed and used as a generator (benchmarks/peer_scvi.py, in .venv-peer: `make bench-peer-env`),
# and its generated.h5ad is scored by exp_script/evaluate.py against the held-out cells with the training cells
# (all default metrics, in the project's .venv). Prints mean ± sd over seeds beside the positive control.
#
#   bash benchmarks/bench_peer.sh                            # Baron, seeds 0 1, outputs in checkpoint/peer/
#   SEEDS=0 EXTRA_DATASETS="pbmc:data/pbmc.h5ad:bulk_labels" bash benchmarks/bench_peer.sh checkpoint/peer
#
# DATASETS (default baron = dataset/baron_human.h5ad, label key cell_type1; also pbmc3k = dataset/pbmc3k.h5ad,
# cell_type) names built-in datasets; EXTRA_DATASETS
# adds specs NAME:PATH:LABEL_KEY (space-separated; the file's X must hold raw counts). SPLIT_baron=FOLDER (SPLIT_NAME
# for any dataset) reuses an existing split folder (train.h5ad, heldout.h5ad) instead of OUT/NAME/split.
# MAX_EPOCHS (300), N_LATENT (30), THREADS (1) are passed on; a run whose evaluation exists is reused (delete
# OUT/NAME/seedS to redo it). Wall times per stage: OUT/NAME/seedS/times.tsv; the table: OUT/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/lib.sh
source benchmarks/lib.sh
PY=${PY:-.venv/bin/python}
PEER_PY=${PEER_PY:-.venv-peer/bin/python}
OUT=${1:-checkpoint/peer}
SEEDS=${SEEDS:-"0 1"}
DATASETS=${DATASETS-baron}  # DATASETS= (empty) with EXTRA_DATASETS runs only those
EXTRA_DATASETS=${EXTRA_DATASETS:-}
MAX_EPOCHS=${MAX_EPOCHS:-300}
N_LATENT=${N_LATENT:-30}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -x "$PY" ]; then
  echo "error: $PY is missing; run make install (or give PY=...)" >&2; exit 2
fi
if [ ! -x "$PEER_PY" ]; then
  echo "error: $PEER_PY is missing; run make bench-peer-env" >&2; exit 2
fi
mkdir -p "$OUT"


specs=""
for name in $DATASETS; do
  case $name in
    baron) specs="$specs baron:dataset/baron_human.h5ad:cell_type1" ;;
    pbmc3k) specs="$specs pbmc3k:dataset/pbmc3k.h5ad:cell_type" ;;
    *) echo "error: unknown dataset $name; give it as NAME:PATH:LABEL_KEY in EXTRA_DATASETS" >&2; exit 2 ;;
  esac
done
specs="$specs $EXTRA_DATASETS"
names=""
for spec in $specs; do  # every spec is checked before anything runs
  IFS=: read -r name data label rest <<< "$spec"
  if [ -z "$name" ] || [ -z "$data" ] || [ -z "$label" ] || [ -n "$rest" ]; then
    echo "error: dataset spec $spec is not NAME:PATH:LABEL_KEY" >&2; exit 2
  fi
  if [ ! -f "$data" ]; then echo "error: dataset $name: $data does not exist" >&2; exit 2; fi
  names="$names $name"
done

for spec in $specs; do
  IFS=: read -r name data label <<< "$spec"
  dir="$OUT/$name"
  split_var="SPLIT_$name"
  split=${!split_var:-$dir/split}
  if [ ! -f "$split/heldout.h5ad" ]; then
    "$PY" exp_script/split.py --data_dir "$data" --label_key "$label" --out "$split" --heldout_fraction 0.2 --seed 0
  fi
  for seed in $SEEDS; do
    run="$dir/seed$seed"
    mkdir -p "$run"
    times="$run/times.tsv"
    touch "$times"
    if [ ! -f "$run/generated.h5ad" ]; then
      timed "$times" "scvi (train, generate, posterior predictive)" "$PEER_PY" benchmarks/peer_scvi.py \
        --train "$split/train.h5ad" --label_key "$label" --out "$run" --seed "$seed" --max_epochs "$MAX_EPOCHS" \
        --n_latent "$N_LATENT" --threads "$THREADS" > "$run/peer.log" 2>&1 || { tail -5 "$run/peer.log" >&2; exit 1; }
    fi
    if [ ! -f "$run/evaluation/metrics.json" ]; then
      timed "$times" "evaluation" "$PY" exp_script/evaluate.py --real "$split/heldout.h5ad" --train "$split/train.h5ad" \
        --generated "$run/generated.h5ad" --label_key "$label" --out "$run/evaluation" --seed "$seed" \
        --plots False --progress False > /dev/null 2> "$run/evaluation.log" || { tail -5 "$run/evaluation.log" >&2; exit 1; }
    fi
  done
done
# shellcheck disable=SC2086
"$PY" -m benchmarks.peer_summary "$OUT" $names
