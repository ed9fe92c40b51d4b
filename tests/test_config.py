"""TrainConfig: built from the command line, in code or from config.json, and validated
whoever built it. Bad values end as `error: ... Fix: ...` with exit 2 before anything is
read or written."""
from __future__ import annotations

import dataclasses

import pytest

from model.train import get_args_parser
from model.train import main as train_main
from model.training.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)

BAD_FLAGS = [
    (["--bs", "0"], "--bs"),
    (["--bs", "-3"], "--bs"),
    (["--epochs", "-1"], "--epochs"),
    (["--frozen-epochs", "-2"], "--frozen-epochs"),
    (["--frozen-epochs", "0", "--epochs", "0"], "nothing would be trained"),
    (["--lr", "0"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--lr", "fast"], "not a number"),
    (["--wd", "-0.1"], "--wd"),
    (["--valid-pct", "0"], "--valid-pct"),
    (["--valid-pct", "1"], "--valid-pct"),
    (["--crop", "128"], "--crop"),
    (["--crop", "4"], "--crop"),
    (["--size", "8"], "--size"),
    (["--size", "5000"], "--size"),
    (["--stain-jitter", "2"], "--stain-jitter"),
    (["--max-items", "3"], "--max-items"),
    (["--workers", "-1"], "--workers"),
    (["--seed", "-1"], "--seed"),
    (["--no-checks", "--drop-bad"], "--drop-bad"),
    (["--device", "cpu", "--precision", "fp16"], "fp16"),
]


@pytest.mark.parametrize("flags,fragment", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_values_are_refused_before_anything_happens(flags, fragment, tmp_path, capsys):
    run = tmp_path / "run"
    rc = train_main([*flags, "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Fix: " in err and fragment in err, err
    assert "Traceback" not in err and not run.exists()


def test_code_built_configs_are_validated_too():
    with pytest.raises(ConfigError, match="--bs"):
        TrainConfig(optim=OptimConfig(bs=0))
    with pytest.raises(ConfigError, match="--epochs"):
        TrainConfig(schedule=ScheduleConfig(epochs=-1))
    with pytest.raises(ConfigError, match="learning-rate finder"):
        TrainConfig(schedule=ScheduleConfig(lr_auto=True, lr_find=False))
    with pytest.raises(ConfigError, match="--data"):
        TrainConfig(data=DataConfig(spec=" "))
    with pytest.raises(ConfigError, match="must be a ScheduleConfig"):
        TrainConfig(schedule={"epochs": 2})
    good = TrainConfig()
    with pytest.raises(ConfigError, match="--valid-pct"):
        dataclasses.replace(good, split=dataclasses.replace(good.split, valid_pct=2.0))


def test_command_line_and_code_give_the_same_config():
    args = get_args_parser().parse_args(["--data", "synthetic:n=300", "--epochs", "3",
                                         "--bs", "16", "--no-pretrained", "--lr", "1e-3"])
    from_cli = TrainConfig.from_args(args)
    in_code = TrainConfig(data=DataConfig(spec="synthetic:n=300"),
                          schedule=ScheduleConfig(epochs=3, lr=1e-3),
                          optim=OptimConfig(bs=16),
                          model=dataclasses.replace(TrainConfig().model, pretrained=None))
    assert from_cli == in_code


def test_json_round_trip_and_unknown_keys():
    config = TrainConfig(schedule=ScheduleConfig(preset="quick", epochs=4)).resolve(True)
    assert config.resolved and TrainConfig.from_dict(config.to_dict()) == config
    broken = config.to_dict()
    broken["optim"]["batch"] = 8  # a typo must not pass silently
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_dict(broken)


def test_resolve_fills_only_what_was_not_given():
    given = TrainConfig(schedule=ScheduleConfig(preset="standard", epochs=1),
                        optim=OptimConfig(bs=8))
    resolved = given.resolve(synthetic=False)
    standard = TrainConfig(schedule=ScheduleConfig(preset="standard")).resolve(False)
    assert (resolved.schedule.epochs, resolved.optim.bs) == (1, 8)
    assert resolved.schedule.frozen_epochs == standard.schedule.frozen_epochs
    assert resolved.input == standard.input and resolved.runtime.device == "cpu"
