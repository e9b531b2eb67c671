"""Faulty plugins (real installed distributions) are reported and skipped."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.usefixtures("faulty_plugins"), pytest.mark.backend_independent]


def _reasons(data: dict) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for report in data["broken"]:
        reasons[report["distribution"]] = reasons.get(report["distribution"], "") + report["reason"] + "\n"
    return reasons


def test_faulty_plugins_are_reported_and_good_ones_kept(experts_json):
    data = experts_json()
    reasons = _reasons(data)
    assert "import failed: RuntimeError: kvlm_broken_fixture fails to import on purpose" in reasons[
        "kvlm-broken-fixture"
    ]
    assert "expert name 'medical' is already provided by kvlm-medical" in reasons["kvlm-clash-fixture"]
    assert "kvlm_register_experts() returned an item that is not a kvlm.ExpertSpec" in reasons["kvlm-badspec-fixture"]
    assert "kvlm_register_datasets() must return a list of kvlm.DatasetSpec" in reasons["kvlm-badspec-fixture"]
    assert all(r["version"] == "0.0.1" and r["entry_point"] for r in data["broken"])
    experts = {e["name"]: e for e in data["experts"]}
    assert {"ffn", "medical", "legal", "retail"} <= set(experts)
    assert experts["medical"]["distribution"] == "kvlm-medical" and experts["medical"]["domain"] == "medical"
    assert "badspec" not in experts


def test_table_lists_broken_plugins(kvlm_cli):
    out = kvlm_cli("experts", "list").stdout
    broken = out[out.index("broken plugins (skipped):") :]
    for distribution in ("kvlm-broken-fixture", "kvlm-clash-fixture", "kvlm-badspec-fixture"):
        assert f"  {distribution} 0.0.1 (" in broken


def test_denied_distribution_is_not_even_imported(experts_json):
    data = experts_json(env={"KVLM_DISABLE_PLUGINS": "kvlm-broken-fixture,kvlm-badspec-fixture"})
    assert {r["distribution"] for r in data["broken"]} == {"kvlm-clash-fixture"}


def test_first_party_name_wins_clash_unless_disabled(experts_json):
    data = experts_json(env={"KVLM_DISABLE_PLUGINS": "kvlm-medical"})
    experts = {e["name"]: e for e in data["experts"]}
    assert experts["medical"]["distribution"] == "kvlm-clash-fixture"
    assert "kvlm-clash-fixture" not in {r["distribution"] for r in data["broken"]}


def test_python_api_reports_broken_plugins(run_python):
    code = (
        "import json, kvlm.experts as e; "
        "print(json.dumps({'broken': sorted({r.distribution for r in e.broken()}), "
        "'medical': e.available()['medical'].distribution, 'reason': str(e.broken()[0])}))"
    )
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["broken"] == ["kvlm-badspec-fixture", "kvlm-broken-fixture", "kvlm-clash-fixture"]
    assert out["medical"] == "kvlm-medical"
    assert out["reason"].startswith("kvlm-") and "0.0.1" in out["reason"]
