"""Start a search runner subprocess, SIGKILL it once its state file says it is far enough, and
hand back the state it left: what the resume tests restart from."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from asvit_kernels.atomic import torch_load


def kill_when(cmd: list[str], state: Path, ready: Callable[[dict], bool], log_path: Path,
              timeout: float = 60.0) -> dict:
    """Run ``cmd``, poll ``state`` until ``ready(state_dict)``, SIGKILL the process, and return the
    state it left. Fails if the runner exits on its own or never gets ready."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stderr=log)
        try:
            end = time.monotonic() + timeout
            while not (state.exists() and ready(torch_load(state))):
                assert proc.poll() is None, f"runner exited early ({proc.returncode}): {log_path.read_text()}"
                assert time.monotonic() < end, f"the runner never got ready in {timeout}s ({state})"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return torch_load(state)
