"""Shared fixtures: a small synthetic COCO-layout dataset, made once per test session."""
import pytest

from single_stage_detector.data.synthetic import ensure_synthetic_coco


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    its models are tiny, and on 2 shared cores the thread pool's hand-offs cost more than they save
    (and a DALI thread competes for the same cores). Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_coco(tmp_path_factory):
    """64 training and 16 validation images in the COCO 2017 layout."""
    root = tmp_path_factory.mktemp("small_coco")
    ensure_synthetic_coco(root, num_train=64, num_val=16, seed=3)
    return root


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One `demo` run (the CPU demo's defaults, ~1 min on 2 cores), shared by the tests that
    need a trained checkpoint: ``{"out": output folder, "data": its synthetic dataset, "proc": the process}``."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("demo_run")
    out, data = root / "demo", root / "synthetic"
    proc = subprocess.run([sys.executable, "-m", "single_stage_detector", "demo", "--data-dir", str(data),
                           "--output-dir", str(out)], capture_output=True, text=True, cwd=root, timeout=900)
    return {"out": out, "data": data, "proc": proc}


# Groups of several minutes each (pytest-xdist): the trained demo and its users, the two other
# demos to their targets, the bad-input table (two training runs per row), the fault tests.
LONGEST_GROUPS_FIRST = ("demo_run", "tests/test_yolo_demo.py", "tests/test_dali.py", "tests/test_bad_input.py",
                        "tests/test_reliability.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Mark ``cuda`` every test that is skipped when CUDA is unavailable (a ``skipif`` whose
    reason names CUDA), so that ``pytest -m cuda`` (the GPU check) selects exactly those.

    Under ``pytest -n N --dist loadgroup`` (``make test``): the tests of one file run on one
    worker (their module and session fixtures are built once), and every test that uses the
    trained ``demo_run`` joins one group, so that the demo trains once."""
    groups = {}
    for item in items:
        group = "demo_run" if "demo_run" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item.nodeid] = group
    # The longest groups first (workers take groups in this order): no demo left for the end.
    first = {g: i for i, g in enumerate(LONGEST_GROUPS_FIRST)}
    items.sort(key=lambda it: first.get(groups[it.nodeid], len(first)))
    for item in items:
        if any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
