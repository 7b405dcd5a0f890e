# Shell helpers the benchmark scripts source (after `cd` to the repository root): stage timing and the
# unseen-combination sampling and scoring. Expects PY (the python), for sample_and_score DATA, NUM, THREADS,
# and for autoencoder_file AE_STEPS and AE_PATIENCE.

timed() {  # timed TIMES_FILE NAME COMMAND...: run COMMAND, append "NAME<TAB>seconds" to TIMES_FILE
  local file=$1 name=$2; shift 2
  local start=$SECONDS
  "$@"
  printf "%s\t%s\n" "$name" "$((SECONDS - start))" >> "$file"
}

autoencoder_file() {  # autoencoder_file DIR SEED: the autoencoder a run trains on; with early stopping
  # (AE_PATIENCE > 0) the lowest-validation-loss weights, else the model after AE_STEPS steps
  if [ "${AE_PATIENCE:-0}" -gt 0 ]; then echo "$1/model_seed=$2_best.pt"; else echo "$1/model_seed=$2_step=$AE_STEPS.pt"; fi
}

type_donors() {  # type_donors TYPE: the donors of DATA with cells of cell_type1 TYPE, space-separated
  "$PY" -c "import anndata as a,sys; d=a.read_h5ad(sys.argv[1],backed='r').obs; print(' '.join(sorted(set(d.loc[d['cell_type1'].astype(str)==sys.argv[2],'donor'].astype(str)))))" "$DATA" "$1"
}

sample_and_score() {  # sample_and_score MODEL OUT TYPE DONOR SEED [SAMPLER FLAGS...]: NUM cells of every (TYPE, donor),
  # scored by exp_script/unseen_combination.py for the (TYPE, DONOR) combination into OUT/score
  local model=$1 out=$2 type=$3 donor=$4 seed=$5; shift 5
  local conditions=() d
  for d in $(type_donors "$type"); do conditions+=(--condition "cell_type1=$type,donor=$d"); done
  "$PY" cell_sample.py --model_path "$model" --sample_dir "$out/samples" --num_samples "$NUM" \
    "${conditions[@]}" --seed "$seed" --threads "$THREADS" --progress False "$@"
  "$PY" exp_script/unseen_combination.py score --real "$DATA" --generated "$out/samples/generated.h5ad" \
    --cell_type "$type" --donor "$donor" --out "$out/score"
}
