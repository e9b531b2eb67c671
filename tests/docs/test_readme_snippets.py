"""The README's Python snippets run as written, at test sizes, on every backend."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
# Sizes a reader would use, and the test's: only these literals are changed.
TEST_SIZES = {
    "shapes.generate(24000, seed=0)": "shapes.generate(256, seed=0)",
    "shapes.generate(2000, seed=1)": "shapes.generate(64, seed=1)",
    "epochs=8)": "epochs=1)",
    "epochs=10)": "epochs=1)",
}


def python_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def snippet(first_line: str) -> str:
    """The snippet starting with `first_line`, at test sizes."""
    matches = [s for s in python_snippets() if s.startswith(first_line)]
    assert len(matches) == 1, f"README has {len(matches)} Python snippets starting with {first_line!r}"
    code = matches[0]
    for reader, test in TEST_SIZES.items():
        code = code.replace(reader, test)
    return code


def test_every_readme_snippet_is_checked():
    firsts = sorted(s.splitlines()[0] for s in python_snippets())
    # The retrieval-augmentation snippet continues the section's prose (its dual encoder, catalogue
    # and tokenizers are built in the text before it); tests/models/test_rag.py runs those calls.
    assert firsts == [
        "from kvlm.data import make_pair_dataset",
        "from kvlm.models import RetrievalAugmentedVLM, RetrievalReader, build_index",
        "import keras",
        "import kvlm",
    ]


# Keras warns that `fit`'s default `shuffle=True` does not apply to a tf.data dataset (the snippet's
# dataset shuffles itself).
@pytest.mark.filterwarnings("ignore:`shuffle=True` was passed:UserWarning")
def test_training_and_dual_encoder_snippets_run(tmp_path, monkeypatch):
    import keras

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet("import keras"), namespace)
    model, tokenizer, answers = namespace["model"], namespace["tokenizer"], namespace["answers"]
    loaded = keras.saving.load_model(tmp_path / "vqa.keras")
    from kvlm.data import make_dataset

    batch = next(iter(make_dataset(namespace["test"][:8], tokenizer, answers, 32)))[0]
    np.testing.assert_allclose(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0), atol=1e-5)
    assert model.history.history["loss"][0] > 0 and np.isfinite(model.history.history["loss"][0])

    exec(snippet("from kvlm.data import make_pair_dataset"), namespace)
    losses = namespace["model"].history.history["loss"]
    assert len(losses) == 1 and np.isfinite(losses[0])


def test_plugin_experts_snippet_routes_to_the_named_plugin_experts():
    from kvlm.layers.moe.sparse_moe import SparseMoE

    namespace: dict = {}
    exec(snippet("import kvlm"), namespace)
    assert {"medical", "legal", "retail"} <= set(namespace["kvlm"].experts.available())
    moe_layers = [layer for layer in namespace["model"]._flatten_layers() if isinstance(layer, SparseMoE)]
    assert len(moe_layers) == 1
    assert moe_layers[0].expert_names == ["medical", "legal", "retail"]
    assert moe_layers[0].top_k == 1
