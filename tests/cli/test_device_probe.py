"""The CLI's device probe drops TensorFlow's expected cuInit error line, and nothing else."""

import os
import subprocess
import sys

import pytest

from kvlm.cli import build_parser
from kvlm.cli.device_probe import NVIDIA_DRIVER, filtered_stderr

pytestmark = pytest.mark.backend_independent

PROBE = """
import os, sys
from kvlm.cli.device_probe import probe_devices
probe_devices()
import tensorflow as tf
print(len(tf.config.list_physical_devices("CPU")))
os.write(2, b"still here\\n")
"""


def test_filtered_stderr_keeps_every_other_line(capfd):
    with filtered_stderr("failed call to cuInit"):
        os.write(2, b"first line\nE cuda_platform.cc:51] failed call to cuInit: UNKNOWN ERROR (303)\nlast line\n")
    assert capfd.readouterr().err == "first line\nlast line\n"


@pytest.mark.skipif(os.path.exists(NVIDIA_DRIVER), reason="an NVIDIA driver is installed: cuInit errors are real here")
def test_probe_silences_cuinit_on_a_machine_without_a_driver():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
    assert "cuInit" not in result.stderr
    assert "still here" in result.stderr


@pytest.mark.parametrize(
    "argv, uses_tensorflow",
    [
        (["experts", "list"], False),
        (["data", "--output", "d"], False),
        (["experts", "install", "--output", "r"], True),  # builds and measures a Keras model
        (["export", "--model", "r"], True),
    ],
)
def test_commands_that_load_tensorflow_probe_its_devices_first(argv, uses_tensorflow):
    assert getattr(build_parser().parse_args(argv), "uses_tensorflow", True) is uses_tensorflow
