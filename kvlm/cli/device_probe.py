"""TensorFlow's device probe without its CUDA error line on machines that have no NVIDIA driver.

The TensorFlow wheel is built with CUDA: the first time it lists devices it calls `cuInit`,
and on a machine without an NVIDIA driver it logs `failed call to cuInit: ... (303)` at error
level, though nothing is wrong. On such machines `probe_devices` lists the devices once with
the process's standard error diverted, and writes back every line but that one. Where a
driver is installed, the message means a real GPU problem, so nothing is filtered.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

NVIDIA_DRIVER = "/proc/driver/nvidia"
EXPECTED_WITHOUT_DRIVER = "failed call to cuInit"


@contextlib.contextmanager
def filtered_stderr(drop: str) -> Iterator[None]:
    """Diverts file descriptor 2 while the block runs, then writes back the lines without `drop`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if drop.encode() not in line]
            if kept:
                os.write(2, b"".join(kept))


def probe_devices() -> None:
    """Lists TensorFlow's devices once, dropping the expected cuInit error where no driver exists."""
    if os.path.exists(NVIDIA_DRIVER):
        return
    with filtered_stderr(EXPECTED_WITHOUT_DRIVER):
        import tensorflow as tf

        tf.config.list_physical_devices()
