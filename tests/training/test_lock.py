"""The run directory's lock: one run at a time, the holder named, stale locks taken over, bad
directories refused with one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from modlm.training.lock import LOCK_FILE, RunDirLock, RunDirLockedError, make_run_dir

# A second process that takes the lock, says so, and waits to be killed.
_HOLDER = (
    "import sys, time\n"
    "from modlm.training.lock import RunDirLock\n"
    "RunDirLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path / 'run'``; yields (run_dir, process)."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_holder_is_refused_with_one_line_naming_the_first(holder):
    run, proc = holder
    with pytest.raises(RunDirLockedError) as err:
        RunDirLock(run).acquire()
    msg = str(err.value)
    assert "\n" not in msg and str(run) in msg
    assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "--out-dir" in msg
    assert isinstance(err.value, ValueError)  # the CLI's one-line handler catches it


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(holder):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / LOCK_FILE).exists()  # SIGKILL left the file behind
    notes: list[str] = []
    with RunDirLock(run, say=notes.append):
        holder_now = json.loads((run / LOCK_FILE).read_text())
        assert holder_now["pid"] == os.getpid() and holder_now["host"] == socket.gethostname()
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "stale" in notes[0]
    assert not (run / LOCK_FILE).exists()  # released: the file is gone


def test_in_one_process_the_lock_is_exclusive_and_released(tmp_path):
    run = tmp_path / "run"
    with RunDirLock(run) as first:
        assert first.path == run / LOCK_FILE
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
            RunDirLock(run).acquire()
    with RunDirLock(run):  # free again, without a note
        pass


def test_a_lock_file_from_another_host_is_not_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "then"}))
    with pytest.raises(RunDirLockedError) as err:
        RunDirLock(run).acquire()
    msg = str(err.value)
    assert "\n" not in msg and "elsewhere.example" in msg and f"delete {run / LOCK_FILE}" in msg


def test_bad_run_directories_are_one_line_value_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    for path, fragment in ((a_file, "it is a file"), (a_file / "run", f"{a_file} is a file")):
        with pytest.raises(ValueError) as err:
            make_run_dir(path)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"TrainConfig.out_dir={str(path)!r} is invalid") and fragment in msg


def test_an_unwritable_run_directory_is_a_one_line_value_error(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a permission bit allows: /proc refuses everyone
        with pytest.raises(ValueError, match=r"^TrainConfig\.out_dir='/proc/modlm-run' is invalid: cannot create"):
            RunDirLock("/proc/modlm-run").acquire()
        return
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(ValueError, match=r"^TrainConfig\.out_dir=.* is invalid: cannot write"):
            RunDirLock(ro).acquire()
        with pytest.raises(ValueError, match="is invalid: cannot create it"):
            RunDirLock(ro / "sub").acquire()
    finally:
        ro.chmod(0o700)
