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
    assert (d.preset, d.threshold, d.momentum, d.weight_decay, d.max_samples) == ("ssd300_resnet34", None, 0.9, 5e-4, 1)
    from single_stage_detector.train import resolve_preset

    assert resolve_preset(d)[1].threshold == 0.23  # no --threshold: the benchmark preset's target
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


@pytest.mark.parametrize("bounds,ok", [((40, 50), True), ((44, 55), True), ((48, 60), True), ((36, 45), True),
                                       ((45, 55), False), ((44, 56), False), ((40,), False),
                                       ((44, 60), False), ((40, 55), False)])  # one k for the pair
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


def test_division_auto_is_open_on_a_synthetic_folder_without_the_flag(tmp_path):
    """The benchmark preset on a synthetic dataset generated earlier (no --synthetic now) is open,
    as the README says: closed means real COCO; also for the init_datasets.sh layout."""
    from single_stage_detector.data.synthetic_params import MARKER_FILE

    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / MARKER_FILE).write_text("{}")
    assert TrainConfig(data_dir=str(tmp_path / "synthetic")).resolved_division(True) == "open"
    (tmp_path / "root" / "coco2017").mkdir(parents=True)
    (tmp_path / "root" / "coco2017" / MARKER_FILE).write_text("{}")
    assert TrainConfig(data_dir=str(tmp_path / "root")).resolved_division(True) == "open"
    assert TrainConfig(data_dir=str(tmp_path)).resolved_division(True) == "closed"


def test_default_workers_fit_the_machine():
    import os

    from single_stage_detector.config import default_num_workers

    cores = len(os.sched_getaffinity(0))
    assert TrainConfig().num_workers == min(4, cores)
    assert default_num_workers(2) == min(2, cores)


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


@pytest.mark.parametrize("field,value,flag", [("threshold", 0.2, "--threshold"),
                                              ("lr_decay_factor", 0.2, "--lr-decay-factor"),
                                              ("momentum", 0.95, "--momentum")])
def test_closed_division_fixes_target_decay_factor_and_momentum(field, value, flag):
    cfg = TrainConfig(data_dir="/d", lr_decay_epochs=(44, 55), **{field: value})
    with pytest.raises(ConfigError, match=flag):
        cfg.validate(closed=True)
    cfg.validate(closed=False)  # free in the open division
    TrainConfig(data_dir="/d", lr_decay_epochs=(44, 55)).validate(closed=True)  # the defaults are the rules'


def test_warmup_factor_is_an_integer():
    assert _parse(["--data-dir", "/d", "--warmup-factor", "1"]).warmup_factor == 1
    with pytest.raises(SystemExit):  # argparse: "argument --warmup-factor: invalid int value: '0.5'"
        _parse(["--data-dir", "/d", "--warmup-factor", "0.5"])
    for bad in (0.5, 1.0, -1):
        with pytest.raises(ConfigError, match="--warmup-factor"):
            TrainConfig(data_dir="/d", warmup_factor=bad).validate()


def test_a_schedule_without_evaluation_is_refused():
    with pytest.raises(ConfigError, match="--epochs: 2 with --eval-every 5 schedules no evaluation"):
        TrainConfig(data_dir="/d", epochs=2, eval_every=5).validate()
    with pytest.raises(ConfigError, match="--eval-every 1 --eval-start 3"):
        TrainConfig(data_dir="/d", epochs=2, eval_every=1, eval_start=3).validate()
    with pytest.raises(ConfigError, match="--eval-epochs 90"):
        TrainConfig(data_dir="/d", epochs=80, eval_epochs=(90,)).validate()
    TrainConfig(data_dir="/d", epochs=2, eval_every=5, eval_only=True).validate()  # evaluates once anyway
    TrainConfig(data_dir="/d", epochs=5, eval_every=5).validate()


def test_eval_precision_is_its_own_setting_and_fp32_by_default():
    import torch

    from single_stage_detector.engine import AmpSettings

    assert TrainConfig(data_dir="/d").eval_amp == "auto"
    for device in ("cpu", "cuda"):
        assert not AmpSettings.resolve_eval("auto", torch.device(device)).enabled  # fp32 (docs/ACCURACY.md)
    assert AmpSettings.resolve("auto", torch.device("cuda")).dtype == torch.bfloat16  # training: unchanged
    assert AmpSettings.resolve_eval("bf16", torch.device("cpu")).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="--eval-amp"):
        TrainConfig(data_dir="/d", eval_amp="fp8").validate()
