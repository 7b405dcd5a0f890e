"""benchmarks/bench_decoder_levers.py: variants, the table it resumes from, and its summary."""
import pytest

from benchmarks import bench_decoder_levers as levers


def test_variants_by_name_or_flags():
    assert levers.parse_variant("baseline") == ("baseline", "")
    assert levers.parse_variant("kl_1") == ("kl_1", "--kl_weight 1")
    assert levers.parse_variant("mine=--latent_dim 7 --dropout 0.1") == ("mine", "--latent_dim 7 --dropout 0.1")
    with pytest.raises(SystemExit, match="unknown variant"):
        levers.parse_variant("no_such_variant")


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
