"""GrownTextEncoder and ExpertAnswerHead: the layers through which experts join a base, against NumPy."""

import keras
import numpy as np
import pytest

from kvlm.domain_experts.layers import OFF, ExpertAnswerHead, GrownTextEncoder
from kvlm.layers import TextEncoder

_np = keras.ops.convert_to_numpy

V, L, D = 20, 6, 16


def _text_encoder():
    encoder = TextEncoder(V, L, D, num_layers=1, num_heads=2, intermediate_dim=32, name="text_encoder")
    encoder.build((None, L))
    return encoder


def test_grown_text_encoder_keeps_the_base_and_embeds_new_ids_with_its_rows(tmp_path):
    base = _text_encoder()
    grown = GrownTextEncoder(base, 3)
    grown.build((None, L))
    assert tuple(grown.extra_embeddings.shape) == (3, D) and len(grown.weights) == len(base.weights) + 1
    ids = np.array([[2, 5, 7, 0, 0, 0], [3, 19, 4, 8, 1, 0]], "int32")
    np.testing.assert_allclose(_np(grown(ids)), _np(base(ids)), atol=1e-6)
    # New id V + 1 with row 1 set to the base's row of id 9 reads exactly as id 9.
    rows = np.random.default_rng(0).normal(size=(3, D)).astype("float32")
    rows[1] = _np(base.embedding.token_embedding.embeddings)[9]
    grown.extra_embeddings.assign(rows)
    swapped = ids.copy()
    swapped[1, 1] = V + 1
    reference = ids.copy()
    reference[1, 1] = 9
    np.testing.assert_allclose(_np(grown(swapped)), _np(base(reference)), atol=1e-6)
    changed = ids.copy()
    changed[1, 1] = V + 2
    assert not np.allclose(_np(grown(changed))[1], _np(base(ids))[1], atol=1e-3)

    inputs = keras.Input((L,), dtype="int32")
    model = keras.Model(inputs, grown(inputs))
    model.save(tmp_path / "grown.keras")
    restored = keras.saving.load_model(tmp_path / "grown.keras")
    np.testing.assert_allclose(_np(restored(swapped)), _np(model(swapped)), atol=1e-6)


@pytest.mark.parametrize("extra,match", [(0, "extra_vocabulary_size=0"), (True, "extra_vocabulary_size=True")])
def test_grown_text_encoder_rejects_bad_sizes(extra, match):
    with pytest.raises(ValueError, match=f"Received: {match}"):
        GrownTextEncoder(_text_encoder(), extra)
    with pytest.raises(ValueError, match="Received: text_encoder="):
        GrownTextEncoder(keras.layers.Dense(3), 2)


def _head(keys=None):
    # Base answers 0..3; expert 0 adds columns 4, 5; expert 1 adds columns 5, 6 (column 5 shared).
    head = ExpertAnswerHead(4, [[4, 5], [5, 6]], router_keys=keys)
    head.build((None, D))
    rng = np.random.default_rng(1)
    for w in head.weights:
        if w.trainable or "kernel" in w.path or "bias" in w.path:
            w.assign(rng.normal(size=w.shape).astype("float32"))
    return head


def test_expert_answers_compete_only_where_their_expert_is_routed(tmp_path):
    keys = np.eye(3, D, dtype="float32")  # cosine keys: base, expert 0, expert 1
    head = _head(keys)
    rng = np.random.default_rng(2)
    routed = np.array([0, 1, 2, 1, 0, 2])
    pooled = (keys[routed] * 3.0 + 0.1 * rng.normal(size=(6, D))).astype("float32")
    np.testing.assert_array_equal(_np(head.routed_expert(pooled)), routed)

    logits = _np(head(pooled))
    base = pooled @ _np(head.base_kernel) + _np(head.base_bias)
    e0 = pooled @ _np(head.expert_kernels[0]) + _np(head.expert_biases[0])
    e1 = pooled @ _np(head.expert_kernels[1]) + _np(head.expert_biases[1])
    expected = np.full((6, 7), OFF, np.float32)
    expected[:, :4] = base
    expected[routed == 1, 4:6] = e0[routed == 1]
    expected[routed == 2, 5:7] = e1[routed == 2]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)

    # Without keys (a specialist) every expert is on; a shared answer takes the higher logit.
    open_logits = _np(_head_like(head)(pooled))
    np.testing.assert_allclose(open_logits[:, 5], np.maximum(e0[:, 1], e1[:, 0]), rtol=1e-5, atol=1e-4)

    inputs = keras.Input((D,))
    model = keras.Model(inputs, head(inputs))
    model.save(tmp_path / "head.keras")
    np.testing.assert_allclose(_np(keras.saving.load_model(tmp_path / "head.keras")(pooled)), logits, atol=1e-4)


def _head_like(head):
    """`head`'s weights in a head without router keys."""
    open_head = ExpertAnswerHead(4, [[4, 5], [5, 6]])
    open_head.build((None, D))
    for source, target in zip([w for w in head.weights if "router_keys" not in w.path], open_head.weights):
        target.assign(source)
    return open_head


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, [[1]]), "Received: num_base_answers=0"),
        ((4, [[3, 4]]), r"columns >= num_base_answers.*Received: num_base_answers=4"),
        ((4, [[4, 6]]), r"fill the columns after the base's.*Received: expert_answers=\[\[4, 6\]\]"),
    ],
)
def test_expert_answer_head_rejects_bad_columns(args, match):
    with pytest.raises(ValueError, match=match):
        ExpertAnswerHead(*args)


def test_expert_answer_head_rejects_keys_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"Received: router_keys.shape=\(2, 16\)"):
        ExpertAnswerHead(4, [[4, 5], [5, 6]], router_keys=np.ones((2, D)))
    head = ExpertAnswerHead(4, [[4]], router_keys=np.ones((2, 8)))
    with pytest.raises(ValueError, match=r"width 16. Received: shape \(2, 8\)"):
        head.build((None, D))
