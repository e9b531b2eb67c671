"""Helpers for the plugin tests: run kvlm in a fresh process; install faulty plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvlm.experts import ALLOW_ENV, DENY_ENV, refresh

FIXTURES = Path(__file__).parent / "fixtures"
FAULTY = ("kvlm-broken-fixture", "kvlm-clash-fixture", "kvlm-badspec-fixture")
REPO = Path(__file__).resolve().parents[2]


def _run_python(args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    """Runs `python ARGS` in a fresh interpreter (so newly installed plugins are seen)."""
    full_env = {k: v for k, v in os.environ.items() if k not in (ALLOW_ENV, DENY_ENV)}
    full_env.update(env or {})
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout
    )


def _kvlm_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = _run_python(["-m", "kvlm", *args], env=env)
    assert result.returncode == 0, result.stderr
    return result


def _experts_json(env: dict[str, str] | None = None) -> dict:
    return json.loads(_kvlm_cli("experts", "list", "--json", env=env).stdout)


@pytest.fixture
def run_python():
    """`run_python(args, env=None)`: a fresh interpreter, without the caller's plugin filters."""
    return _run_python


@pytest.fixture
def kvlm_cli():
    """`kvlm_cli(*args, env=None)`: runs `python -m kvlm ARGS`, asserting exit code 0."""
    return _kvlm_cli


@pytest.fixture
def experts_json():
    """`experts_json(env=None)`: the parsed output of `kvlm experts list --json`."""
    return _experts_json


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def faulty_plugins(tmp_path_factory):
    """Installs the faulty fixture plugins into a folder of their own, seen by the kvlm processes
    this module starts (through PYTHONPATH), so other test processes never see them."""
    root = tmp_path_factory.mktemp("faulty_plugins")
    site = root / "site"
    for name in FAULTY:  # built from copies: a build writes beside its sources
        shutil.copytree(FIXTURES / name, root / name)
    result = _pip("install", "--no-deps", "--no-build-isolation", "--target", str(site),
                  *(str(root / name) for name in FAULTY))
    assert result.returncode == 0, result.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        yield FAULTY


@pytest.fixture
def clean_env(monkeypatch):
    """No plugin filters from the calling shell; discovery re-runs on exit."""
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.delenv(DENY_ENV, raising=False)
    yield monkeypatch
    refresh()
