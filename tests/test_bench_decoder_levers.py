"""benchmarks/bench_decoder_levers.py: variants, the table it resumes from, and its summary."""
import pytest

from benchmarks import bench_decoder_levers as levers


def test_variants_by_name_or_flags():
    assert levers.parse_variant("baseline") == ("baseline", "")
    assert levers.parse_variant("kl_1") == ("kl_1", "--kl_weight 1")
    assert levers.parse_variant("mine=--latent_dim 7 --dropout 0.1") == ("mine", "--latent_dim 7 --dropout 0.1")
    with pytest.raises(SystemExit, match="unknown variant"):
        levers.parse_variant("no_such_variant")


def test_a_variant_names_its_run_seed():
    flags = "--init_from 'p q/pretrain_seed{seed}/model_seed={seed}_best.pt' --latent_dim 20"
    assert levers.seeded_flags(flags, 2) == ["--init_from", "p q/pretrain_seed2/model_seed=2_best.pt",
                                             "--latent_dim", "20"]
    assert levers.seeded_flags("--dropout 0.1", 5) == ["--dropout", "0.1"]


def test_every_named_variant_is_accepted_by_the_trainer():
    from VAE.VAE_train import build_parser

    parser = build_parser()
    for name, flags in levers.VARIANTS.items():
        args = parser.parse_args(["--data_dir", "x.h5ad", "--save_dir", "out"] + flags.split())
        assert args.data_dir == "x.h5ad", name


def test_summary_is_mean_and_sd_over_seeds():
    rows = [dict(zip(levers.COLUMNS, values)) for values in [
        ("tiny", 0, 500, 90.0, 0.50, 0.50, 0.58, 0.53, 0.51, 0.56, 0.29),
        ("tiny", 1, 400, 80.0, 0.52, 0.50, 0.62, 0.55, 0.53, 0.58, 0.29),
        ("baseline", 0, 100, 140.0, 0.50, 0.50, 0.70, 0.68, 0.68, 0.69, 0.30)]]
    text = levers.summary(rows, ["baseline", "tiny"])
    lines = text.splitlines()
    assert lines[2].startswith("| baseline | 0.500 ± 0.000")
    tiny = lines[3].split(" | ")
    assert tiny[0] == "| tiny" and tiny[3] == "0.600 ± 0.028" and tiny[-1] == "2 |"


def test_fitting_subset_keeps_label_shares_and_is_reused(tmp_path):
    import anndata
    import numpy as np
    import pandas as pd

    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    cells = anndata.AnnData(np.arange(100 * 3, dtype=np.float32).reshape(100, 3),
                            obs=pd.DataFrame({"cell_type1": labels}, index=[f"c{i}" for i in range(100)]))
    fit = tmp_path / "train.h5ad"
    cells.write_h5ad(fit)
    path = levers.fitting_subset(str(fit), 20, "cell_type1", seed=1)
    drawn = anndata.read_h5ad(path)
    assert drawn.n_obs == 20
    assert drawn.obs["cell_type1"].value_counts().to_dict() == {"a": 12, "b": 6, "c": 2}
    assert len(set(drawn.obs_names)) == 20 and set(drawn.obs_names) <= set(cells.obs_names)
    rows = [int(name[1:]) for name in drawn.obs_names]
    assert np.array_equal(drawn.X, cells.X[rows])  # the cells' own values, not a copy of one
    assert levers.fitting_subset(str(fit), 20, "cell_type1", seed=1) == path  # written once, then reused
    everything = anndata.read_h5ad(levers.fitting_subset(str(fit), 500, "cell_type1", seed=1))
    assert everything.n_obs == 100
    with pytest.raises(SystemExit, match="--label_key 'donor'"):
        levers.fitting_subset(str(fit), 10, "donor", seed=1)


def test_rescore_replaces_the_scores_of_runs_already_in_the_table(tmp_path, monkeypatch):
    import argparse

    old = dict(zip(levers.COLUMNS, ("tiny", 0, 500, 90.0, 0.50, 0.50, 0.58, 0.53, 0.51, 0.56, 0.29)))
    other = dict(zip(levers.COLUMNS, ("tiny", 1, 400, 80.0, 0.52, 0.50, 0.62, 0.55, 0.53, 0.58, 0.29)))
    done = {("tiny", 0): old, ("tiny", 1): other}
    new_scores = {"control_knn_auc": 0.49, "control_rf_auc": 0.48, "decoded_fit_knn_auc": 0.55,
                  "decoded_fit_rf_auc": 0.52, "reconstructed_val_knn_auc": 0.5, "reconstructed_val_rf_auc": 0.51}
    calls = []
    monkeypatch.setattr(levers, "score", lambda args, vae_path, fit, val, folder, seed: calls.append(vae_path)
                        or dict(new_scores))
    args = argparse.Namespace(out=str(tmp_path), rescore=False)
    assert levers.one_run(args, "tiny", "", 0, "fit", "val", done)["decoded_fit_knn_auc"] == 0.58 and not calls
    args.rescore = True
    row = levers.one_run(args, "tiny", "", 0, "fit", "val", done)
    assert calls == [str(tmp_path / "tiny_seed0" / "model_seed=0_best.pt")]
    assert row["decoded_fit_knn_auc"] == 0.55 and row["best_step"] == 500
    lines = (tmp_path / "levers.tsv").read_text().splitlines()
    assert lines[0].split("\t") == levers.COLUMNS and len(lines) == 3
    assert lines[1].split("\t")[6] == "0.55" and lines[2].split("\t")[6] == "0.62"
