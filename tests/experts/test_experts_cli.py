"""`kvlm experts list` in a subprocess."""

from __future__ import annotations

from importlib import metadata


def test_list_prints_a_table(kvlm_cli):
    lines = kvlm_cli("experts", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "DOMAIN", "DISTRIBUTION", "VERSION"]
    rows = {line.split()[0]: line.split() for line in lines[1 : lines.index("")]}
    for name in ("medical", "legal", "retail"):
        assert rows[name] == [name, name, f"kvlm-{name}", metadata.version(f"kvlm-{name}")]
    assert rows["ffn"][:3] == ["ffn", "general", "kvlm"]
    assert "datasets:" in lines


def test_list_json(experts_json):
    data = experts_json()
    experts = {e["name"]: e for e in data["experts"]}
    assert experts["medical"]["distribution"] == "kvlm-medical"
    assert experts["medical"]["version"] == metadata.version("kvlm-medical")
    assert experts["legal"]["domain"] == "legal" and experts["retail"]["vocabulary_size"] > 0
    datasets = {d["name"]: d["distribution"] for d in data["datasets"]}
    assert datasets["retail_shelves"] == "kvlm-retail"
    assert isinstance(data["broken"], list)


def test_list_honours_the_allow_list(experts_json):
    data = experts_json(env={"KVLM_PLUGINS": "kvlm-retail"})
    assert {e["name"] for e in data["experts"]} == {"ffn", "retail"}
    assert {d["name"] for d in data["datasets"]} == {"retail_shelves"}


def test_experts_needs_a_subcommand(run_python):
    result = run_python(["-m", "kvlm", "experts"])
    assert result.returncode == 2 and "list" in result.stderr
