"""Run the harness's CLI as a real process, without paying for Python's start-up every time.

``run_cli(args, cwd=...)`` behaves like ``subprocess.run([sys.executable, "-m",
"single_stage_detector", *args], capture_output=True, text=True, cwd=cwd)``: each command runs
in its own process, through the real entry point, with its own stdout/stderr at the
file-descriptor level (DataLoader workers and DALI threads write there too), its exit code
and its atexit handlers. The process is forked from a *zygote*, a process started once per
test process that has already imported torch, torchvision, NumPy, Pillow, pycocotools and
DALI; importing them takes 4-9 s on 2 CPU cores, far more than most of the commands the
tests run.

The zygote imports only; it runs no tensor operation, so it holds no thread pool to lose in
the fork. A command with its own environment (``env=...``) is forked from a zygote started
with that environment, so that variables read at import time (``OMP_NUM_THREADS``, ...) apply.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_PER_TEST_VARIABLES = ("PYTEST_CURRENT_TEST",)
_zygotes: dict[frozenset | None, subprocess.Popen] = {}  # by environment (None: this process's)


def _start_zygote(env: dict | None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1, env=env)
    ready = proc.stdout.readline()
    if ready.strip() != "ready":
        raise RuntimeError(f"CLI zygote failed to start: {ready!r}")
    atexit.register(_stop_zygote, proc)
    return proc


def _stop_zygote(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_cli(args: list, cwd: str | Path | None = None, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m single_stage_detector *args`` in ``cwd``; a ``CompletedProcess`` with text output.

    Raises:
        subprocess.TimeoutExpired: the command ran past ``timeout`` seconds (it is killed).
    """
    args = [str(a) for a in args]
    cmd = [sys.executable, "-m", "single_stage_detector", *args]
    # pytest sets PYTEST_CURRENT_TEST anew for every test: not a reason for another zygote.
    key = None if env is None else frozenset((k, v) for k, v in env.items() if k not in _PER_TEST_VARIABLES)
    with _lock, tempfile.TemporaryDirectory(prefix="cli_run_") as tmp:
        zygote = _zygotes.get(key)
        if zygote is None or zygote.poll() is not None:
            zygote = _zygotes[key] = _start_zygote(env)
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        request = {"argv": args, "cwd": str(cwd if cwd is not None else os.getcwd()), "stdout": out, "stderr": err,
                   "env": None if env is None else dict(env)}
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline())
        ready, _, _ = select.select([zygote.stdout], [], [], timeout)
        if not ready:
            os.killpg(pid, signal.SIGKILL)
            zygote.stdout.readline()
            raise subprocess.TimeoutExpired(cmd, timeout, Path(out).read_text(errors="replace"),
                                            Path(err).read_text(errors="replace"))
        code = int(zygote.stdout.readline())
        return subprocess.CompletedProcess(cmd, code, Path(out).read_text(errors="replace"),
                                           Path(err).read_text(errors="replace"))


# -- the zygote ------------------------------------------------------------------------------


def _run_child(request: dict) -> None:
    """In the forked process: set up the command's files and directory, run it, exit with its code."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills the command and its workers, nothing else
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for src, dst in ((devnull, 0), (out, 1), (err, 2)):
            os.dup2(src, dst)
            os.close(src)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        if request["env"] is not None:  # exactly the command's environment (its zygote started with it)
            os.environ.clear()
            os.environ.update(request["env"])
        import single_stage_detector.__main__ as cli

        sys.argv = [cli.__file__, *request["argv"]]  # as `python -m` sets it
        main = cli.main

        try:
            code = main(request["argv"]) or 0
        except SystemExit as e:  # argparse errors and explicit exits
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # what the interpreter prints for an uncaught exception
            import traceback

            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # exit handlers, as at interpreter exit (DataLoader workers, logging, ...)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(int(code) & 0xFF)


def _zygote_main() -> None:
    import numpy  # noqa: F401  (imports only: no tensor op, so no thread pool exists before a fork)
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import single_stage_detector.evaluation  # noqa: F401
    import single_stage_detector.train  # noqa: F401
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.backend
    except ImportError:
        pass
    else:
        # Unloading DALI's library at exit takes 0.5-1 s and frees nothing the process's end does
        # not (its pipelines are still shut down by their own exit handler).
        atexit.unregister(nvidia.dali.backend._unload_dali)
    # The exit handlers the imports registered stay: a fresh `python -m` would have them too.
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    _zygote_main()
