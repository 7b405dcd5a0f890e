#!/usr/bin/env bash
# Sampling-time levers on the held-out protocol, from one trained run (no retraining): the guidance weight
# and EMA vs raw weights. Each setting: sample as many cells per type as training had (same seed), then
# evaluate against the held-out cells with the training cells (positive control, novelty, usefulness).
#
#   benchmarks/bench_gap_levers.sh RUN MODEL
# RUN holds split/{train,heldout}.h5ad (exp_script/split.py); MODEL is the diffusion checkpoint
# (cell_train.py). Outputs go to OUT/<setting>/{samples,evaluation} (OUT defaults to RUN/levers); a summary
# table is printed and written to OUT/summary.md. SEED (default 0) seeds sampling and evaluation; THREADS (default 1) pins threads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${1:?usage: bench_gap_levers.sh RUN MODEL}
MODEL=${2:?usage: bench_gap_levers.sh RUN MODEL}
SEED=${SEED:-0}
WEIGHTS=${WEIGHTS:-"0 0.5 1 2"}
export OMP_NUM_THREADS=${THREADS:-1}
OUT=${OUT:-"$RUN/levers"}
mkdir -p "$OUT"

run_setting() {  # run_setting NAME SAMPLER-FLAGS...
  local name=$1; shift
  local folder="$OUT/$name"
  local start=$SECONDS
  "$PY" cell_sample.py --model_path "$MODEL" --sample_dir "$folder/samples" --match_counts --seed "$SEED" \
    --progress False "$@"
  "$PY" exp_script/evaluate.py --real "$RUN/split/heldout.h5ad" --train "$RUN/split/train.h5ad" \
    --generated "$folder/samples/generated.h5ad" --label_key cell_type1 --out "$folder/evaluation" \
    --seed "$SEED" --controls False --plots False --augmentation_seeds 3 --progress False
  echo "$name $((SECONDS - start)) s"
}

for w in $WEIGHTS; do
  run_setting "guide_w_$w" --guide_w "$w"
done
run_setting "raw_weights_guide_w_0.5" --guide_w 0.5 --use_ema False
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys

out = sys.argv[1]
keys = ["knn_auc", "rf_auc", "ilisi", "celltypist_accuracy", "de_lfc_pearson", "marker_jaccard"]
nan = float("nan")


def fmt(value):
    return f"{value:.3f}" if isinstance(value, float) else str(value)


rows, control = [], None
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, "evaluation", "metrics.json")
    if not os.path.isfile(path):
        continue
    metrics = json.load(open(path))
    if control is None:
        positive = metrics["train_vs_heldout"]["overall"]
        tstr = metrics["usefulness"]["train_on_synthetic"].get("real training cells", {}).get("macro_f1", nan)
        control = ["train vs held-out (positive control)"] + [positive.get(k, nan) for k in keys] + [1.0, tstr]
    overall = metrics["generated"]["overall"]
    novelty = metrics["novelty"]["sections"]["generated"]
    tstr = metrics["usefulness"]["train_on_synthetic"].get("generated", {}).get("macro_f1", nan)
    rows.append([name] + [overall.get(k, nan) for k in keys] + [novelty["distance_ratio"], tstr])
header = ["setting"] + keys + ["novelty distance ratio", "train-on-synthetic macro-F1"]
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in ([control] if control else []) + rows]
text = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.md"), "w").write(text)
print(text)
PYEOF
