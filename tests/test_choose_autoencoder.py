"""exp_script/choose_autoencoder.py: the autoencoder recipe chosen on validation cells inside the training data.
Candidates parsed, the rule (known answer, ties), a real choice between an untrained and a trained decoder, the
winner trained on every cell with its own flags, reuse of finished runs, and the one-line refusals."""
import json

import pytest

from exp_script import choose_autoencoder as cli
from exp_script.evaluation import autoencoder_choice
from exp_script.evaluation.autoencoder_choice import criterion, parse_candidates, pick
from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.core.errors import UsageError

SMALL = ["--hidden_dims", "16", "--latent_dim", "4", "--batch_size", "32", "--max_steps", "40",
         "--checkpoint_freq", "40", "--early_stopping_patience", "20", "--log_interval", "10",
         "--decoder_label_key", "none", "--refit_dispersion", "False"]


def choose(counts_h5ad, save_dir, *extra):
    return cli.main(["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
                     "--threads", "1", *SMALL, *extra])


def test_candidates_are_default_names_or_name_equals_flags():
    assert parse_candidates(["default", "batch32"], cli.SHARED_DEFAULTS) == {
        "default": "", "batch32": "--batch_size 32 --max_steps 12000 --checkpoint_freq 12000 --early_stopping_patience 1200"}
    assert parse_candidates(["default", "lr=--lr 1e-4"]) == {"default": "", "lr": "--lr 1e-4"}
    for bad in (["default", "default"], ["default"], ["default", "unknown"], ["default", "a b=--lr 1"]):
        with pytest.raises(UsageError):
            parse_candidates(bad)


def test_every_default_candidate_is_a_valid_early_stopped_recipe():
    from guided_diffusion.core.errors import settings_worded_as_flags

    candidates = parse_candidates(list(autoencoder_choice.DEFAULT_CANDIDATES), cli.SHARED_DEFAULTS)
    assert list(candidates) == ["default", "batch32", "vae"]
    for name, flags in candidates.items():
        configs = autoencoder_choice.autoencoder_configs(
            ["--data_dir", "x.h5ad", "--save_dir", "s"] + cli.SHARED_DEFAULTS + flags.split(), name)
        with settings_worded_as_flags():
            for config in configs:
                config.validate()
        caps = {"default": 3000, "batch32": 12000, "vae": 6000}
        training = configs[2]
        assert training.early_stopping_patience > 0 and training.max_steps == caps[name]
        # every default candidate has as many cells' worth of training before a best step that early stopping can
        # still act on as the shared settings (a longer patience is not paid for by the cap)
        room = (training.max_steps - training.early_stopping_patience) * training.batch_size
        assert room >= (3000 - 300) * 128
    assert candidates["vae"] == ("--latent_dim 30 --kl_weight 1 --dropout 0.1 --early_stopping_patience 1000 "
                                 "--max_steps 6000 --checkpoint_freq 6000")


def test_vae_has_twice_the_shared_step_cap():
    longer = cli.SHARED_DEFAULTS + ["--max_steps", "12000", "--checkpoint_freq", "5000"]
    assert autoencoder_choice.default_candidate_flags("vae", longer).endswith(
        "--early_stopping_patience 1000 --max_steps 24000 --checkpoint_freq 10000")


def test_runs_of_a_default_candidate_whose_defaults_changed_are_kept_aside(tmp_path):
    """A default candidate run with earlier defaults trains again; its earlier runs keep their rows and folders
    under a new name (nothing lost), a second change goes to _previous2; a user's own NAME=FLAGS is not touched."""
    shared = cli.SHARED_DEFAULTS
    candidates = parse_candidates(["default", "vae", "mine=--lr 1e-4"], shared)
    for seed in (0, 1):
        folder = tmp_path / "candidates" / f"vae_seed{seed}"
        folder.mkdir(parents=True)
        (folder / "model_seed=0_best.pt").write_text(f"weights {seed}")
    rows = [{"candidate": "vae", "seed": "0", "flags": "--latent_dim 30"},
            {"candidate": "vae", "seed": "1", "flags": "--latent_dim 30"},
            {"candidate": "default", "seed": "0", "flags": ""},
            {"candidate": "mine", "seed": "0", "flags": "--lr 1e-3"}]
    renamed = autoencoder_choice.set_aside_changed_defaults(str(tmp_path), rows, candidates, shared, log=None)
    assert renamed == {"vae": "vae_previous"}
    assert [row["candidate"] for row in rows] == ["vae_previous", "vae_previous", "default", "mine"]
    for seed in (0, 1):
        kept = tmp_path / "candidates" / f"vae_previous_seed{seed}" / "model_seed=0_best.pt"
        assert kept.read_text() == f"weights {seed}" and not (tmp_path / "candidates" / f"vae_seed{seed}").exists()
    rows.append({"candidate": "vae", "seed": "0", "flags": "--latent_dim 20"})
    assert autoencoder_choice.set_aside_changed_defaults(str(tmp_path), rows, candidates, shared, log=None) == {
        "vae": "vae_previous2"}
    current = [{"candidate": "vae", "seed": "0", "flags": candidates["vae"]}]
    assert autoencoder_choice.set_aside_changed_defaults(str(tmp_path), current, candidates, shared, log=None) == {}


def test_batch32_keeps_the_shared_number_of_epochs():
    """The small-batch default scales the shared step cap, checkpoint interval and patience by batch / 32."""
    longer = cli.SHARED_DEFAULTS + ["--max_steps", "10000", "--checkpoint_freq", "5000"]
    assert autoencoder_choice.default_candidate_flags("batch32", longer) == (
        "--batch_size 32 --max_steps 40000 --checkpoint_freq 20000 --early_stopping_patience 1200")
    half = cli.SHARED_DEFAULTS + ["--batch_size", "64", "--early_stopping_patience", "250"]
    assert autoencoder_choice.default_candidate_flags("batch32", half) == (
        "--batch_size 32 --max_steps 6000 --checkpoint_freq 6000 --early_stopping_patience 500")
    assert autoencoder_choice.default_candidate_flags("default", longer) == ""
    with pytest.raises(UsageError, match="shared flags"):
        parse_candidates(["default", "batch32"], ["--no_such_flag", "1"])


def test_runs_the_step_cap_ended_are_found():
    rows = [{"candidate": "a", "seed": 0, "best_step": 700}, {"candidate": "a", "seed": 1, "best_step": 701},
            {"candidate": "b", "seed": 0, "best_step": 3000}]
    assert autoencoder_choice.capped_runs(rows, {"a": (1000, 300), "b": (12000, 1200)}) == ["a seed 1"]


def test_the_rule_is_the_lowest_mean_of_the_four_aucs_and_the_first_wins_a_tie():
    def row(name, *values):
        return {"candidate": name, **dict(zip(autoencoder_choice.SCORES, values))}

    rows = [row("a", 0.6, 0.6, 0.5, 0.5), row("a", 0.6, 0.7, 0.5, 0.6), row("b", 0.5, 0.5, 0.6, 0.6),
            row("b", 0.5, 0.5, 0.6, 0.5)]
    scores = criterion(rows)
    assert scores == pytest.approx({"a": 0.575, "b": 0.5375})
    assert pick(scores) == "b"
    assert pick({"x": 0.5, "y": 0.5}) == "x" and pick({"y": 0.5, "x": 0.5}) == "y"


def test_a_trained_decoder_beats_an_untrained_one_and_is_trained_on_every_cell(tmp_path, counts_h5ad):
    untrained = "untrained=--lr 1e-9 --max_steps 1 --early_stopping_patience 1 --log_interval 1"
    choice = choose(counts_h5ad, tmp_path, "--candidates", untrained, "trained=--lr 3e-3", "--seeds", "0", "1")
    assert choice.chosen == "trained" and choice.scores["trained"] < choice.scores["untrained"] - 0.05
    rows = (tmp_path / "choice.tsv").read_text().splitlines()
    assert len(rows) == 5  # a header and two candidates x two seeds
    record = json.loads((tmp_path / "choice.json").read_text())
    assert record["chosen"] == "trained" and record["flags"] == "--lr 3e-3" and record["seeds"] == [0, 1]
    final = load_checkpoint(choice.final_path)
    assert final["train_config"]["lr"] == 3e-3 and final["train_config"]["seed"] == 0
    assert final["train_config"]["data_dir"].endswith("counts.h5ad")  # every cell, not the fitting cells
    assert "trained (chosen)" in (tmp_path / "choice.md").read_text()
    # the one-step candidate cannot early-stop before its cap (best step 1 + patience 1 > 1 step): reported
    assert {"untrained seed 0", "untrained seed 1"} <= set(choice.capped) and choice.capped == record["capped_runs"]
    assert "warning: untrained seed 0" in (tmp_path / "choice.md").read_text()
    final_capped = final["step"] + 20 > 40  # the winner's final run, by its own cap (40) and patience (20)
    assert ("trained seed 0 (final)" in choice.capped) == final_capped


def test_finished_runs_are_reused(tmp_path, counts_h5ad, monkeypatch):
    first = choose(counts_h5ad, tmp_path, "--candidates", "default", "slow=--lr 1e-4", "--seeds", "0")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("VAE.autoencoder_training.train_autoencoder", no_training)
    again = choose(counts_h5ad, tmp_path, "--candidates", "default", "slow=--lr 1e-4", "--seeds", "0")
    assert again.chosen == first.chosen and again.scores == pytest.approx(first.scores)


def test_a_new_winner_sets_the_earlier_final_autoencoder_aside(tmp_path, counts_h5ad):
    untrained = "untrained=--lr 1e-9 --max_steps 1 --early_stopping_patience 1 --log_interval 1"
    first = choose(counts_h5ad, tmp_path, "--candidates", untrained,
                   "slow=--lr 1e-9 --max_steps 2 --early_stopping_patience 1 --log_interval 1", "--seeds", "0")
    earlier = load_checkpoint(first.final_path)["train_config"]["lr"]
    assert earlier == 1e-9
    second = choose(counts_h5ad, tmp_path, "--candidates", untrained, "trained=--lr 3e-3", "--seeds", "0")
    assert second.chosen == "trained" and load_checkpoint(second.final_path)["train_config"]["lr"] == 3e-3
    kept = list((tmp_path / "final_previous").glob("model_seed=0_best.pt"))
    assert len(kept) == 1 and load_checkpoint(str(kept[0]))["train_config"]["lr"] == earlier  # nothing lost


def test_a_candidate_renamed_flags_in_the_same_folder_is_refused(tmp_path, counts_h5ad, capsys):
    choose(counts_h5ad, tmp_path, "--candidates", "default", "fast=--lr 1e-3", "--seeds", "0", "--final", "False")
    with pytest.raises(SystemExit) as exit_info:
        choose(counts_h5ad, tmp_path, "--candidates", "default", "fast=--lr 1e-2", "--seeds", "0")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'fast'" in err and "--lr 1e-3" in err


@pytest.mark.parametrize("extra, words", [
    (["--candidates", "default", "bad=--lr -1"], "candidate bad"),
    (["--candidates", "default", "bad=--no_such_flag 1"], "candidate bad"),
    (["--candidates", "default", "bad=--seed 3"], "--seed is set by the choice"),
    (["--seed", "3"], "--seed is set by the choice"),
    (["--early_stopping_patience", "0"], "--early_stopping_patience"),
    (["--candidates", "default"], "at least two candidates"),
])
def test_bad_candidates_are_refused_in_one_line_before_anything_trains(tmp_path, counts_h5ad, capsys, extra, words):
    with pytest.raises(SystemExit) as exit_info:
        choose(counts_h5ad, tmp_path / "out", *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err
    assert not (tmp_path / "out" / "candidates").exists()
