"""--ema_rate: the autoencoder's weight average. The average's arithmetic (known answer), its warm-up, that the
running weights train exactly as without it while the checkpoints hold their average (replayed step by step),
that early stopping keeps the average, exact resume, and the one-line refusals."""
import pytest
import torch

from guided_diffusion.core.container import load_checkpoint
from VAE import VAE_train
from guided_diffusion.training.optim import ema_warmup_rate as ema_decay, update_weight_average


def train(counts_h5ad, save_dir, *extra):
    argv = ["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
            "--batch_size", "32", "--log_interval", "3", "--hidden_dims", "16", "--latent_dim", "6",
            "--max_steps", "12", "--checkpoint_freq", "6", "--decoder_label_key", "none",
            "--refit_dispersion", "False", *extra]
    return VAE_train.main(argv)


def small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_the_average_moves_towards_the_weights_and_copies_the_batchnorm_statistics():
    average, model = small_model(0), small_model(1)
    model[1].running_mean.fill_(0.5)
    model[1].num_batches_tracked.fill_(7)
    before = [p.detach().clone() for p in average.parameters()]
    update_weight_average(average, model, 0.75)
    for kept, old, new in zip(average.parameters(), before, model.parameters()):
        torch.testing.assert_close(kept, 0.75 * old + 0.25 * new.detach())
    assert torch.equal(average[1].running_mean, torch.full((3,), 0.5))
    assert int(average[1].num_batches_tracked) == 7


def test_the_decay_warms_up_from_a_tenth_to_the_rate():
    assert ema_decay(0.99, 0) == pytest.approx(0.1)
    assert ema_decay(0.99, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.99, 10 ** 6) == 0.99
    assert ema_decay(0.5, 100) == 0.5


def weights(checkpoint):
    return {k: v for k, v in checkpoint["state_dict"].items()}


def test_running_weights_train_as_without_the_average_and_checkpoints_hold_their_average(tmp_path, counts_h5ad):
    rate = 0.8
    train(counts_h5ad, tmp_path / "plain", "--checkpoint_freq", "1", "--max_steps", "9")
    train(counts_h5ad, tmp_path / "ema", "--ema_rate", str(rate), "--max_steps", "9", "--checkpoint_freq", "3")
    plain = {step: weights(load_checkpoint(tmp_path / "plain" / f"model_seed=0_step={step}.pt"))
             for step in range(1, 10)}
    for step in (3, 6, 9):
        saved = load_checkpoint(tmp_path / "ema" / f"model_seed=0_step={step}.pt")
        state = torch.load(tmp_path / "ema" / f"opt_seed=0_step={step}.pt", weights_only=True)
        running = state["running_weights"]
        # the average does not change the training: the running weights are the plain run's
        assert all(torch.equal(running[k], plain[step][k]) for k in running)
        assert saved["train_config"]["ema_rate"] == rate
    # the average at step 9, replayed from step 3's with the plain run's weights of steps 4 to 9
    average = {k: v.clone() for k, v in weights(load_checkpoint(tmp_path / "ema" / "model_seed=0_step=3.pt")).items()}
    for step in range(4, 10):
        decay = ema_decay(rate, step)
        for name, value in plain[step].items():
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                average[name] = value.clone()
            else:
                average[name] = average[name] * decay + value * (1 - decay)
    final = weights(load_checkpoint(tmp_path / "ema" / "model_seed=0_step=9.pt"))
    for name in final:
        torch.testing.assert_close(final[name], average[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(final["log_theta"], plain[9]["log_theta"])


def test_early_stopping_keeps_the_average_of_its_best_step(tmp_path, counts_h5ad):
    train(counts_h5ad, tmp_path, "--ema_rate", "0.7", "--early_stopping_patience", "30", "--checkpoint_freq", "3")
    best = load_checkpoint(tmp_path / "model_seed=0_best.pt")
    step = best["step"]
    assert step % 3 == 0 and best["train_config"]["ema_rate"] == 0.7
    at_step = load_checkpoint(tmp_path / f"model_seed=0_step={step}.pt")
    running = torch.load(tmp_path / f"opt_seed=0_step={step}.pt", weights_only=True)["running_weights"]
    assert all(torch.equal(best["state_dict"][k], at_step["state_dict"][k]) for k in best["state_dict"])
    assert not all(torch.equal(best["state_dict"][k], running[k]) for k in running)


def test_a_resumed_run_ends_where_the_straight_run_ends(tmp_path, counts_h5ad):
    straight = train(counts_h5ad, tmp_path / "a", "--ema_rate", "0.9")
    resumed = train(counts_h5ad, tmp_path / "b", "--ema_rate", "0.9",
                    "--state_dict", str(tmp_path / "a" / "model_seed=0_step=6.pt"))
    first, second = load_checkpoint(straight), load_checkpoint(resumed)
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])
    a = torch.load(tmp_path / "a" / "opt_seed=0_step=12.pt", weights_only=True)["running_weights"]
    b = torch.load(tmp_path / "b" / "opt_seed=0_step=12.pt", weights_only=True)["running_weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_another_rate_is_refused_in_one_line(tmp_path, counts_h5ad, capsys):
    train(counts_h5ad, tmp_path / "a", "--ema_rate", "0.9", "--max_steps", "6")
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path / "a", "--state_dict", str(tmp_path / "a"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--ema_rate 0.9" in err and "--ema_rate 0.0" in err


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_a_rate_outside_zero_to_one_is_refused(tmp_path, counts_h5ad, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--ema_rate", value)
    assert exit_info.value.code == 2
    assert "--ema_rate" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pt"))
