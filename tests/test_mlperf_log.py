"""The MLPerf logger: format, rank gating, exactly-once guard, flushing."""
import json

import pytest

from single_stage_detector.mlperf_log import C, MLPerfLogger


def _lines(path):
    out = []
    for line in path.read_text().splitlines():
        assert line.startswith(":::MLLOG ")
        out.append(json.loads(line[len(":::MLLOG "):]))
    return out


def test_events_are_written_and_flushed_immediately(tmp_path, capsys):
    log = MLPerfLogger(tmp_path / "sub" / "run.log")
    log.start(C.INIT_START)
    log.event(C.SEED, 42)
    # Readable before close: a crashed run keeps what it wrote.
    recs = _lines(tmp_path / "sub" / "run.log")
    assert [r["key"] for r in recs] == ["init_start", "seed"]
    assert recs[1]["value"] == 42 and recs[1]["event_type"] == "POINT_IN_TIME"
    assert recs[0]["event_type"] == "INTERVAL_START"
    assert "file" in recs[1]["metadata"] and recs[1]["metadata"]["file"].endswith("test_mlperf_log.py")
    log.close()
    assert ":::MLLOG" in capsys.readouterr().out


def test_other_ranks_write_nothing(tmp_path, capsys):
    log = MLPerfLogger(tmp_path / "r1.log", rank=1)
    log.event(C.SEED, 1)
    log.close()
    assert not (tmp_path / "r1.log").exists()
    assert capsys.readouterr().out == ""


def test_exactly_once_keys_are_guarded(tmp_path):
    log = MLPerfLogger(tmp_path / "x.log", stdout=False)
    log.event(C.GLOBAL_BATCH_SIZE, 32)
    with pytest.raises(RuntimeError, match="global_batch_size"):
        log.event(C.GLOBAL_BATCH_SIZE, 32)
    log.event(C.EVAL_ACCURACY, 0.1, metadata={C.EPOCH_NUM: 1})
    log.event(C.EVAL_ACCURACY, 0.2, metadata={C.EPOCH_NUM: 2})  # many allowed
    log.close()


def test_an_earlier_log_is_kept_aside_not_appended_to(tmp_path):
    path = tmp_path / "mlperf.log"
    for seed in (1, 2, 3):
        log = MLPerfLogger(path, stdout=False)
        log.event(C.SEED, seed)
        log.close()
    assert [r["value"] for r in _lines(path)] == [3]
    assert [r["value"] for r in _lines(tmp_path / "mlperf.log.1")] == [1]
    assert [r["value"] for r in _lines(tmp_path / "mlperf.log.2")] == [2]


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 1.5, None, "0.3"])
def test_eval_accuracy_is_never_a_sentinel_or_nan(tmp_path, value):
    for rank in (0, 1):  # every rank refuses, so that all of them stop alike
        log = MLPerfLogger(tmp_path / f"run{rank}.log", rank=rank, stdout=False)
        with pytest.raises(ValueError, match="refusing to log eval_accuracy"):
            log.event(C.EVAL_ACCURACY, value, metadata={C.EPOCH_NUM: 1})
        log.event(C.EVAL_ACCURACY, 0.0, metadata={C.EPOCH_NUM: 1})
        log.close()
    assert '"eval_accuracy", "value": 0.0' in (tmp_path / "run0.log").read_text()
