"""single_stage_detector: an MLPerf-style time-to-train harness for single-stage detectors."""

__version__ = "0.1.0"
