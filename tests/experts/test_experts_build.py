"""`build_expert`, its errors, and `kvlm.load_model` with plugin layers."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest

import kvlm
import kvlm.testing
from kvlm import experts
from kvlm.experts import discovery, factory


@pytest.mark.parametrize("name", ["ffn", "medical", "legal", "retail"])
def test_build_expert_returns_a_working_layer(clean_env, name):
    layer = experts.build_expert(name, d_model=8, hidden_dim=12)
    assert isinstance(layer, keras.layers.Layer)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (2, 3, 8) and np.all(np.isfinite(y)) and not np.allclose(y, 0)
    assert layer.get_config()["hidden_dim"] == 12


def test_builtin_ffn_expert_passes_conformance(clean_env, tmp_path):
    layer = kvlm.testing.check_expert(experts.available()["ffn"].spec, d_model=8, tmp_path=tmp_path)
    assert type(layer).__name__ == "FFNExpert"
    assert keras.saving.get_registered_name(type(layer)) == "kvlm>FFNExpert"
    assert layer.count_params() == (8 * 32 + 32) + (32 * 8 + 8)


def test_build_expert_validates_d_model(clean_env):
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="Received: d_model="):
            experts.build_expert("ffn", d_model=bad)


def test_unknown_expert_lists_what_is_available(clean_env):
    with pytest.raises(experts.ExpertNotFoundError, match="Unknown expert 'nope'") as info:
        experts.build_expert("nope", d_model=8)
    assert "ffn, legal, medical, retail" in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.distribution is None


def test_missing_first_party_expert_says_what_to_install(clean_env):
    clean_env.setitem(discovery.FIRST_PARTY_EXPERTS, "dermatology", "kvlm-dermatology")
    with pytest.raises(experts.ExpertNotFoundError, match="pip install kvlm-dermatology") as info:
        experts.build_expert("dermatology", d_model=8)
    assert info.value.distribution == "kvlm-dermatology"
    assert experts.distribution_for("dermatology") == "kvlm-dermatology"


def test_disabled_expert_says_it_is_disabled(clean_env):
    clean_env.setenv("KVLM_DISABLE_PLUGINS", "kvlm-medical")
    with pytest.raises(experts.ExpertNotFoundError, match="kvlm-medical, which is disabled"):
        experts.build_expert("medical", d_model=8)
    clean_env.setenv("KVLM_DISABLE_PLUGINS", "")
    clean_env.setenv("KVLM_PLUGINS", "legal")
    with pytest.raises(experts.ExpertNotFoundError, match="installed but disabled"):
        experts.build_expert("medical", d_model=8)


def test_shipped_weights_are_loaded(clean_env, tmp_path):
    source = experts.build_expert("legal", d_model=8)
    source.build((None, 8))
    path = tmp_path / "legal.weights.h5"
    keras.saving.save_weights(source, path)
    spec = kvlm.ExpertSpec("legal", "legal", experts.available()["legal"].spec.build, weights=str(path))
    layer = experts.build_expert("legal", d_model=8)
    factory.load_shipped_weights(layer, discovery.ExpertInfo(spec, "kvlm-legal", "0.1.0"), 8)
    for got, want in zip(layer.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(got, want)
    bad = discovery.ExpertInfo(dataclass_replace(spec, weights=str(tmp_path / "missing.weights.h5")), "x", "0")
    with pytest.raises(ValueError, match="Could not load the weights shipped with expert 'legal'"):
        factory.load_shipped_weights(experts.build_expert("legal", d_model=8), bad, 8)


def dataclass_replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


def _save_expert_model(path, name="medical", d_model=8):
    inputs = keras.Input((4, d_model))
    model = keras.Model(inputs, experts.build_expert(name, d_model=d_model)(inputs))
    model.save(path)
    return model


def _rename_package(path, old: str, new: str):
    """Rewrites a .keras archive as if its class came from another package."""
    renamed = path.with_name(f"renamed_{path.name}")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(renamed, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                data = data.decode().replace(old, new).encode()
            dst.writestr(item, data)
    return renamed


def test_load_model_registers_plugin_classes_in_a_fresh_process(clean_env, tmp_path, run_python):
    path = tmp_path / "medical.keras"
    model = _save_expert_model(path)
    x = np.random.default_rng(0).normal(size=(1, 4, 8)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(model(x)))
    code = f"""
import json, keras, numpy as np, kvlm
try:
    keras.saving.load_model({str(path)!r})
    plain = "loaded"
except Exception as error:
    plain = type(error).__name__
model = kvlm.load_model({str(path)!r})
y = keras.ops.convert_to_numpy(model(np.load({str(tmp_path / 'x.npy')!r})))
print(json.dumps({{"plain": plain, "same": bool(np.allclose(y, np.load({str(tmp_path / 'y.npy')!r}), atol=1e-6))}}))
"""
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"plain": "TypeError", "same": True}


def test_load_model_names_the_missing_distribution(clean_env, tmp_path):
    path = tmp_path / "medical.keras"
    _save_expert_model(path)
    clean_env.setitem(discovery.FIRST_PARTY_EXPERTS, "dermatology", "kvlm-dermatology")
    missing = _rename_package(path, "kvlm_medical", "kvlm_dermatology")
    with pytest.raises(ImportError, match="'kvlm_dermatology>MedicalExpert'.*pip install kvlm-dermatology"):
        kvlm.load_model(missing)
    unknown = _rename_package(path, "kvlm_medical", "acme_experts")
    with pytest.raises(ImportError, match="package 'acme_experts', which no installed kvlm plugin provides"):
        kvlm.load_model(unknown)
    assert isinstance(kvlm.load_model(path), keras.Model)
