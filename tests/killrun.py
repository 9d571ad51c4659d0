"""Run a CLI command as a subprocess and SIGKILL it once a file it writes has enough lines."""

import signal
import subprocess
import time
from pathlib import Path


def kill_when_written(cmd: list[str], env: dict, out: Path, pattern: str, min_lines: int, what: str,
                      timeout: float = 600, poll: float = 0.02) -> Path:
    """Start `cmd`; when `out.glob(pattern)` finds a file with `min_lines` lines, SIGKILL the process.
    Returns that file; fails the test if the process ends first or the file never fills."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found_file = None
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob(pattern))
        # complete lines only: a line still being written (no newline yet) does not count
        if found and found[0].read_bytes().count(b"\n") >= min_lines:
            found_file = found[0]
            break
        time.sleep(poll)
    assert found_file is not None, proc.stderr.read() if proc.poll() is not None else f"{what} never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return found_file
