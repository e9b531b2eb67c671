"""`kvlm experts list` in a subprocess."""

from __future__ import annotations

from importlib import metadata

import pytest

pytestmark = pytest.mark.backend_independent


def test_list_prints_a_table(kvlm_cli):
    lines = kvlm_cli("experts", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "DOMAIN", "DISTRIBUTION", "VERSION"]
    rows = {line.split()[0]: line.split() for line in lines[1 : lines.index("")]}
    for name in ("medical", "legal", "retail"):
        assert rows[name] == [name, name, f"kvlm-{name}", metadata.version(f"kvlm-{name}")]
    assert rows["ffn"][:3] == ["ffn", "general", "kvlm"]
    assert "datasets:" in lines


def test_list_json(experts_json):
    # The faulty fixture plugins another test module may have installed are denied, so
    # exactly the first-party plugins and the built-in expert are left.
    data = experts_json(env={"KVLM_DISABLE_PLUGINS": "kvlm-broken-fixture,kvlm-clash-fixture,kvlm-badspec-fixture"})
    experts = {e["name"]: e for e in data["experts"]}
    assert sorted(experts) == ["ffn", "legal", "medical", "retail"]
    for name in ("medical", "legal", "retail"):
        assert experts[name]["distribution"] == f"kvlm-{name}" and experts[name]["domain"] == name
        assert experts[name]["version"] == metadata.version(f"kvlm-{name}")
        assert experts[name]["vocabulary_size"] >= 16 and experts[name]["description"]
    assert (experts["ffn"]["distribution"], experts["ffn"]["vocabulary_size"]) == ("kvlm", 0)
    datasets = {d["name"]: d["distribution"] for d in data["datasets"]}
    assert datasets == {
        "legal_documents": "kvlm-legal", "medical_scans": "kvlm-medical", "retail_shelves": "kvlm-retail",
    }
    assert data["broken"] == []


def test_list_honours_the_allow_list(experts_json):
    data = experts_json(env={"KVLM_PLUGINS": "kvlm-retail"})
    assert {e["name"] for e in data["experts"]} == {"ffn", "retail"}
    assert {d["name"] for d in data["datasets"]} == {"retail_shelves"}


def test_experts_needs_a_subcommand(run_python):
    result = run_python(["-m", "kvlm", "experts"])
    assert result.returncode == 2 and "list" in result.stderr
