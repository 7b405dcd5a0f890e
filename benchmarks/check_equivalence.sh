#!/usr/bin/env bash
# Same seed, same cells: train a tiny autoencoder and diffusion model and sample them (the default sampler
# and the original DDPM-1000 one) with the code of a git revision and with this checkout, then compare the
# weights and the generated cells bit for bit. For changes that must not change behaviour:
#
#   bash benchmarks/check_equivalence.sh 8d73a2e      # a revision to compare with
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:?give a git revision to compare with}
PY=${PY:-$PWD/.venv/bin/python}
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/ref" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git worktree add -q --detach "$WORK/ref" "$REF"
DATA=$PWD/tests/data/legacy_v1/counts.h5ad

run() {  # run CODE_ROOT OUT
  local root=$1 out=$2
  (cd "$root" && export PYTHONPATH="$root" OMP_NUM_THREADS=1 &&
   "$PY" VAE/VAE_train.py --data_dir "$DATA" --num_genes 12 --save_dir "$out/ae" --max_steps 20 \
     --checkpoint_freq 20 --hidden_dims 16 16 --latent_dim 4 --batch_size 16 --progress False > /dev/null &&
   "$PY" cell_train.py --data_dir "$DATA" --vae_path "$out/ae/model_seed=0_step=20.pt" --label_key cell_type1 \
     --model_name m --save_dir "$out/diffusion" --lr_anneal_steps 30 --save_interval 30 \
     --hidden_dims 16 16 16 16 --batch_size 16 --progress False > /dev/null &&
   "$PY" cell_sample.py --model_path "$out/diffusion/m/model000030.pt" --sample_dir "$out/default" \
     --num_samples 20 --progress False > /dev/null 2>&1 &&
   "$PY" cell_sample.py --model_path "$out/diffusion/m/model000030.pt" --sample_dir "$out/faithful" \
     --num_samples 20 --progress False --use_ddim False --timestep_respacing 1000 --cache_interval 5 \
     --precision fp32 > /dev/null 2>&1)
}
run "$WORK/ref" "$WORK/out_ref"
run "$PWD" "$WORK/out_new"
"$PY" - "$WORK/out_ref" "$WORK/out_new" <<'PY'
import sys
import anndata
import numpy as np
import torch
ref, new = sys.argv[1:]
same = True
for name in ("ae/model_seed=0_step=20.pt", "diffusion/m/model000030.pt", "diffusion/m/ema_0.9999_000030.pt"):
    a, b = (torch.load(f"{root}/{name}", weights_only=True) for root in (ref, new))
    weights = [key for key in ("state_dict", "model") if isinstance(a.get(key), dict)][0]
    equal = all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights])
    print(f"{name}: weights {'identical' if equal else 'DIFFER'}")
    same &= equal
for sampler in ("default", "faithful"):
    a, b = (anndata.read_h5ad(f"{root}/{sampler}/generated.h5ad") for root in (ref, new))
    equal = (a.shape == b.shape and (a.X != b.X).nnz == 0 and (a.layers["counts"] != b.layers["counts"]).nnz == 0
             and a.obs.equals(b.obs))
    print(f"{sampler} sampler: X, counts and obs {'identical' if equal else 'DIFFER'}")
    same &= equal
sys.exit(0 if same else 1)
PY
