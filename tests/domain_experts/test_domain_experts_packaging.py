"""`write_plugin`: the distribution a trained expert is published as builds and installs quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvlm.domain_experts.packaging import EXPERT_FILES, distribution_name, module_name, write_plugin

pytestmark = pytest.mark.backend_independent


def test_the_written_plugin_installs_with_its_expert_and_no_setuptools_warning(tmp_path):
    kvlm_retail = pytest.importorskip("kvlm_retail", reason="the first-party retail plugin ships a trained expert")
    expert = Path(kvlm_retail.__file__).parent / "expert"
    plugin = write_plugin(expert, tmp_path / "plugin", version="1.2.3")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "--target", str(site), str(plugin)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    build_output = result.stdout + result.stderr
    for noise in ("Warning", "would be ignored", "deprecated"):
        assert noise not in build_output, build_output[-3000:]
    package = site / module_name("retail")
    assert sorted(p.name for p in (package / "expert").iterdir()) == sorted(p.name for p in expert.iterdir())
    assert set(EXPERT_FILES) | {"expert.lora.h5"} <= {p.name for p in (package / "expert").iterdir()}
    assert (package / "expert" / "expert.json").read_bytes() == (expert / "expert.json").read_bytes()
    info = next(site.glob(f"{distribution_name('retail').replace('-', '_')}-1.2.3.dist-info"))
    assert "retail = kvlm_retail_expert" in (info / "entry_points.txt").read_text()


def test_plugins_written_by_earlier_versions_still_import_from_the_old_module():
    import importlib
    import sys

    sys.modules.pop("kvlm.models.domain_experts", None)
    with pytest.warns(DeprecationWarning, match="moved to kvlm.domain_experts"):
        old = importlib.import_module("kvlm.models.domain_experts")
    from kvlm.domain_experts import Base, DomainExpert, install_experts, installed_experts

    assert (old.Base, old.TrainedExpert, old.install_experts, old.installed_experts) == (
        Base, DomainExpert, install_experts, installed_experts)
