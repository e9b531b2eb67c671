"""ExpertSpec / DatasetSpec validation and the cheap `import kvlm`."""

from __future__ import annotations

import dataclasses
import json

import pytest

import kvlm
from kvlm.experts import DatasetSpec, ExpertSpec

pytestmark = pytest.mark.backend_independent


def _build(d_model, **options):
    return None


def test_public_names_are_the_same_objects():
    assert kvlm.ExpertSpec is ExpertSpec and kvlm.DatasetSpec is DatasetSpec
    assert kvlm.hookimpl.project_name == "kvlm"


def test_expert_spec_defaults_and_normalisation():
    spec = ExpertSpec("acme-xray", "radiology", _build, vocabulary=["x", "ray"])
    assert (spec.version, spec.description, spec.weights) == ("0", "", None)
    assert spec.vocabulary == ("x", "ray")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad Name"}, "Received: name='Bad Name'"),
        ({"name": ""}, "Received: name=''"),
        ({"domain": ""}, "Received: domain=''"),
        ({"build": "not callable"}, "Received: build='not callable'"),
        ({"vocabulary": "words"}, "Received: vocabulary='words'"),
        ({"vocabulary": ("ok", "")}, "Received: vocabulary=('ok', '')"),
        ({"version": 1}, "Received: version=1"),
    ],
)
def test_expert_spec_rejects_bad_fields(kwargs, message):
    fields = {"name": "good", "domain": "general", "build": _build, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ExpertSpec(**fields)


def test_dataset_spec_requires_callable_load():
    spec = DatasetSpec("scans", "medical", "some scans", lambda split, size, seed: [])
    assert spec.load("train", 0, 0) == []
    with pytest.raises(ValueError, match="Received: load=None"):
        DatasetSpec("scans", "medical", "some scans", None)
    with pytest.raises(ValueError, match="Received: name='Scans!'"):
        DatasetSpec("Scans!", "medical", "", lambda split, size, seed: [])


def test_import_kvlm_and_discovery_stay_cheap(run_python):
    code = (
        "import json, sys, kvlm, kvlm.experts; kvlm.ExpertSpec; kvlm.hookimpl; "
        "names = sorted(kvlm.experts.available()); "
        "print(json.dumps({'names': names, 'heavy': sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') "
        "if m in sys.modules)}))"
    )
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"ffn", "medical", "legal", "retail"} <= set(out["names"])
    assert out["heavy"] == []
