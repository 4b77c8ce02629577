import pytest

from cifar_dist.config import ConfigError, resolve, save_yaml


def test_layers_preset_recipe_file_flags(tmp_path):
    cfg = resolve(["--preset", "seed2", "--recipe", "tutorial"])
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("adam", 1e-3, 100, 20)
    assert (cfg.crop_padding, cfg.flip, cfg.normalize, cfg.schedule) == (0, "none", "imagenet", "constant")
    assert cfg.model.widths == [16, 32] and cfg.model.head == "flatten"
    path = tmp_path / "c.yaml"
    path.write_text("preset: resnet18\nlr: 0.3\nmodel:\n  widths: [8, 16, 32, 64]\n")
    cfg = resolve(["--config", str(path), "--lr", "0.4", "--blocks", "1,1,1,2"])
    assert cfg.preset == "resnet18" and cfg.lr == 0.4  # the flag wins over the file
    assert cfg.model.widths == [8, 16, 32, 64] and cfg.model.blocks == [1, 1, 1, 2]
    assert cfg.model.head == "gap"  # the rest from the preset


def test_saved_config_loads_back_identically(tmp_path):
    cfg = resolve(["--preset", "seed2", "--recipe", "tutorial", "--epochs", "3", "--no-channels-last",
                   "--widths", "16,48"])
    save_yaml(cfg, tmp_path / "config.yaml")
    assert resolve(["--config", str(tmp_path / "config.yaml")]) == cfg


def test_underscore_flags_are_accepted():
    cfg = resolve(["--mixed_precision", "bf16", "--train_subset", "10"])
    assert cfg.mixed_precision == "bf16" and cfg.train_subset == 10


@pytest.mark.parametrize("argv, message", [
    (["--preset", "resnet99"], "unknown preset"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--batch-size", "-4"], "batch_size must be positive"),
    (["--lr", "0"], "lr must be a positive"),
    (["--lr", "nan"], "lr must be a positive"),
    (["--widths", "8,16", "--blocks", "1"], "same length"),
    (["--blocks", "1,0,1"], "at least one block"),
    (["--optimizer", "lion"], "unknown optimizer"),
    (["--epochs", "two"], "epochs in the command line must be int"),
])
def test_bad_values_raise_named_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        resolve(argv)


def test_unknown_key_in_file(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        resolve(["--config", str(tmp_path / "c.yaml")])


def test_help_shows_the_defaults(capsys):
    """train.py's --help: each flag's default (the default recipe's, as its description says); the search's too."""
    from cifar_dist.config import Config, build_parser
    from cifar_dist.search.cli import parse_args

    text = " ".join(build_parser().format_help().split())
    assert f"peak learning rate (default: {Config().lr})" in text and "a --preset or --recipe sets its own" in text
    assert f"(default: {','.join(map(str, Config().model.widths))})" in text
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "(default: 8)" in " ".join(capsys.readouterr().out.split())  # --num-samples
