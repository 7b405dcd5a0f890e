#!/usr/bin/env bash
# An atlas-sized run end to end on synthetic data, with the wall time and peak resident memory of each stage:
# write a sparse h5ad -> train the autoencoder (streamed) -> train the diffusion model on NPROC processes
# (torchrun; streamed, latents on disk) -> sample as many cells as the data has into generated.h5ad.
#
#   bash benchmarks/bench_atlas.sh                      # 1,000,000 cells x 5000 genes
#   CELLS=100000 bash benchmarks/bench_atlas.sh         # the same at 100k cells
#
# Settings (environment): CELLS, GENES (5000), DENSITY (0.05), AE_STEPS (200), DIFFUSION_STEPS (300), NPROC (2),
# THREADS (1: OMP threads per process), WORKDIR (a temporary folder), PY (python). Peak memory is GNU time's
# %M: for torchrun, the largest of its processes (one process's peak, not their sum).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
CELLS=${CELLS:-1000000}
GENES=${GENES:-5000}
DENSITY=${DENSITY:-0.05}
AE_STEPS=${AE_STEPS:-200}
DIFFUSION_STEPS=${DIFFUSION_STEPS:-300}
NPROC=${NPROC:-2}
THREADS=${THREADS:-1}
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/cfdiffusion_bench_atlas}
TORCHRUN=${TORCHRUN:-$(dirname "$(command -v "$PY")")/torchrun}
export OMP_NUM_THREADS=$THREADS
mkdir -p "$WORKDIR"
DATA="$WORKDIR/synthetic_${CELLS}x${GENES}.h5ad"
REPORT="$WORKDIR/stages_${CELLS}.tsv"
printf "stage\tseconds\tpeak_mib\n" > "$REPORT"

stage() {  # stage NAME COMMAND...: run it, append its wall time and peak RSS to the report
    local name=$1; shift
    echo "== $name: $*"
    /usr/bin/time -f "%e %M" -o "$WORKDIR/.time" "$@"
    read -r seconds kib < "$WORKDIR/.time"
    printf "%s\t%s\t%d\n" "$name" "$seconds" $((kib / 1024)) | tee -a "$REPORT"
}

if [ ! -f "$DATA" ]; then
    stage write_h5ad "$PY" -c "import sys; from pathlib import Path; from benchmarks.bench_memory import write_synthetic_h5ad; \
write_synthetic_h5ad(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))" \
        "$DATA" "$CELLS" "$GENES" "$DENSITY"
fi
stage autoencoder "$PY" VAE/VAE_train.py --data_dir "$DATA" --save_dir "$WORKDIR/ae_$CELLS" --backed True \
    --max_steps "$AE_STEPS" --checkpoint_freq "$AE_STEPS" --batch_size 256 --hidden_dims 256 256 256 \
    --threads "$THREADS" --progress False --overwrite True
VAE="$WORKDIR/ae_$CELLS/model_seed=0_step=$AE_STEPS.pt"
rm -rf "$WORKDIR/diffusion/atlas_$CELLS"
stage "diffusion_${NPROC}proc" "$TORCHRUN" --nproc_per_node "$NPROC" cell_train.py --data_dir "$DATA" \
    --vae_path "$VAE" --save_dir "$WORKDIR/diffusion" --model_name "atlas_$CELLS" --backed True \
    --lr_anneal_steps "$DIFFUSION_STEPS" --save_interval "$DIFFUSION_STEPS" --batch_size 256 \
    --threads "$THREADS" --progress False
MODEL="$WORKDIR/diffusion/atlas_$CELLS/model$(printf %06d "$DIFFUSION_STEPS").pt"
stage sample "$PY" cell_sample.py --model_path "$MODEL" --sample_dir "$WORKDIR/samples_$CELLS" \
    --match_counts True --threads "$THREADS" --progress False
echo
column -t "$REPORT"
ls -l "$WORKDIR/samples_$CELLS/generated.h5ad"
