"""Shared fixtures: a small synthetic COCO-layout dataset, made once per test session."""
import pytest

from single_stage_detector.data.synthetic import ensure_synthetic_coco


@pytest.fixture(scope="session")
def small_coco(tmp_path_factory):
    """64 training and 16 validation images in the COCO 2017 layout."""
    root = tmp_path_factory.mktemp("small_coco")
    ensure_synthetic_coco(root, num_train=64, num_val=16, seed=3)
    return root
