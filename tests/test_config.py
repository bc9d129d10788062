"""Config: CLI flags generated from the dataclass, MLPerf rule checks, LR and eval schedules."""
import argparse

import pytest

from single_stage_detector.config import ConfigError, TrainConfig, add_arguments, config_from_args
from single_stage_detector.engine import LRSchedule


def _parse(argv, defaults=None):
    p = argparse.ArgumentParser()
    add_arguments(p, defaults)
    return config_from_args(p.parse_args(argv))


def test_flags_round_trip_and_defaults_are_the_benchmarks():
    cfg = _parse(["--data-dir", "/d", "--lr-decay-epochs", "44", "55", "--no-save-checkpoint", "--seed", "7"])
    assert cfg.lr_decay_epochs == (44, 55) and cfg.save_checkpoint is False and cfg.seed == 7
    d = TrainConfig(data_dir="/d")
    assert (d.preset, d.threshold, d.momentum, d.weight_decay, d.max_samples) == ("ssd300_resnet34", 0.23, 0.9, 5e-4, 1)
    assert d.evaluation_epochs()[:3] == [5, 10, 15]


def test_lr_scales_with_global_batch():
    cfg = TrainConfig(data_dir="/d", batch_size=114, base_lr=2.5e-3)
    assert cfg.global_batch_size(8) == 912
    assert cfg.learning_rate(8) == pytest.approx(2.5e-3 * 912 / 32)
    assert TrainConfig(data_dir="/d", lr=0.09).learning_rate(8) == 0.09


def test_v07_eval_list_is_expressible():
    cfg = TrainConfig(data_dir="/d", eval_epochs=(40, 50, 55, 60, 65, 70, 75, 80), epochs=80)
    assert cfg.evaluation_epochs() == [40, 50, 55, 60, 65, 70, 75, 80]
    assert TrainConfig(data_dir="/d", eval_every=2, eval_start=4, epochs=9).evaluation_epochs() == [4, 6, 8]


@pytest.mark.parametrize("kwargs,flag", [
    ({"max_samples": 10}, "--max-samples"),
    ({"batch_size": 0}, "--batch-size"),
    ({"amp": "fp8"}, "--amp"),
    ({"submission_status": "home"}, "--submission-status"),
    ({"lr_decay_epochs": (50, 40)}, "--lr-decay-epochs"),
    ({"data_dir": None}, "--data-dir"),
])
def test_bad_values_name_the_flag(kwargs, flag):
    cfg = TrainConfig(**{"data_dir": "/d", **kwargs})
    with pytest.raises(ConfigError, match=flag):
        cfg.validate()


@pytest.mark.parametrize("bounds,ok", [((40, 50), True), ((44, 55), True), ((48, 60), True),
                                       ((45, 55), False), ((44, 56), False), ((40,), False)])
def test_closed_division_decay_boundary_rule(bounds, ok):
    cfg = TrainConfig(data_dir="/d", lr_decay_epochs=bounds)
    if ok:
        cfg.validate(closed=True)
    else:
        with pytest.raises(ConfigError, match="lr-decay-epochs"):
            cfg.validate(closed=True)
    cfg.validate(closed=False)  # open division: free


def test_division_auto():
    assert TrainConfig(data_dir="/d").resolved_division(benchmark_preset=True) == "closed"
    assert TrainConfig(data_dir="/d", synthetic=True).resolved_division(True) == "open"
    assert TrainConfig(data_dir="/d").resolved_division(False) == "open"
    assert TrainConfig(data_dir="/d", division="closed").resolved_division(False) == "closed"


def test_lr_schedule_warmup_and_decay():
    s = LRSchedule(base_lr=1.0, warmup_steps=10, warmup_factor=0.0, decay_epochs=(2, 3), decay_factor=0.1,
                   steps_per_epoch=20)
    assert s(0) == pytest.approx(0.0)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(39) == pytest.approx(1.0)      # last step of epoch 2 (1-based)
    assert s(40) == pytest.approx(0.1)      # first step of epoch 3
    assert s(60) == pytest.approx(0.01)
    f1 = LRSchedule(1.0, 10, 1.0, (), 0.1, 20)
    assert f1(0) == pytest.approx(0.5)      # factor 1 starts at half the LR
