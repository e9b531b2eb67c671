"""Discovery through the real entry points of the installed first-party plugins."""

from __future__ import annotations

from importlib import metadata

import pytest

import kvlm
from kvlm import experts

pytestmark = pytest.mark.backend_independent

FIRST_PARTY = {"medical": "kvlm-medical", "legal": "kvlm-legal", "retail": "kvlm-retail"}
DATASETS = {"medical_scans": "kvlm-medical", "legal_documents": "kvlm-legal", "retail_shelves": "kvlm-retail"}


def test_first_party_plugins_are_declared_as_entry_points():
    declared = {ep.dist.name: ep.value for ep in metadata.entry_points(group="kvlm")}
    for distribution in FIRST_PARTY.values():
        assert declared[distribution] == distribution.replace("-", "_")


def test_available_lists_installed_experts_with_distribution_and_version(clean_env):
    found = experts.available()
    for name, distribution in FIRST_PARTY.items():
        info = found[name]
        assert info.name == name and info.spec.domain == name
        assert info.distribution == distribution
        assert info.version == metadata.version(distribution)
        assert info.spec.vocabulary and all(isinstance(w, str) for w in info.spec.vocabulary)
    assert found["ffn"].distribution == "kvlm" and found["ffn"].version == kvlm.__version__
    assert not [r for r in experts.broken() if r.distribution in FIRST_PARTY.values()]


def test_datasets_lists_plugin_datasets(clean_env):
    found = experts.datasets()
    for name, distribution in DATASETS.items():
        assert found[name].distribution == distribution
        assert found[name].version == metadata.version(distribution)
        assert callable(found[name].spec.load)


def test_plugin_manager_holds_the_plugins():
    manager = experts.get_plugin_manager()
    modules = {getattr(p, "__name__", None) for p in manager.get_plugins()}
    assert {"kvlm_medical", "kvlm_legal", "kvlm_retail"} <= modules
    names = {spec.name for specs in manager.hook.kvlm_register_experts() for spec in specs}
    assert {"ffn", "medical", "legal", "retail"} <= names
    bare = experts.get_plugin_manager(load_entry_points=False)
    assert [s.name for specs in bare.hook.kvlm_register_experts() for s in specs] == ["ffn"]


def test_discovery_is_cached_and_refreshable(clean_env):
    first = experts.registry()
    assert experts.registry() is first
    again = experts.refresh()
    assert again is not first and set(again.experts) == set(first.experts)


@pytest.mark.parametrize(
    ("allow", "deny", "expected_experts", "expected_datasets"),
    [
        ("kvlm-legal", "", {"ffn", "legal"}, {"legal_documents"}),
        ("medical, retail", "", {"ffn", "medical", "retail"}, {"medical_scans", "retail_shelves"}),
        ("KVLM_Medical", "", {"ffn", "medical"}, {"medical_scans"}),
        ("", "kvlm-retail", {"ffn", "medical", "legal"}, {"medical_scans", "legal_documents"}),
        ("", "medical,ffn", {"legal", "retail"}, set(DATASETS)),
        ("kvlm-medical,kvlm-legal", "legal", {"ffn", "medical"}, {"medical_scans", "legal_documents"}),
    ],
)
def test_allow_and_deny_lists(clean_env, allow, deny, expected_experts, expected_datasets):
    clean_env.setenv("KVLM_PLUGINS", allow)
    clean_env.setenv("KVLM_DISABLE_PLUGINS", deny)
    first_party = set(FIRST_PARTY) | {"ffn"}
    assert set(experts.available()) & first_party == expected_experts
    assert set(experts.datasets()) & set(DATASETS) == expected_datasets


def test_distribution_for(clean_env):
    assert experts.distribution_for("medical") == "kvlm-medical"
    assert experts.distribution_for("ffn") == "kvlm"
    assert experts.distribution_for("no_such_expert") is None
    clean_env.setenv("KVLM_DISABLE_PLUGINS", "legal")
    assert experts.distribution_for("legal") == "kvlm-legal"
