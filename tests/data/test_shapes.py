import numpy as np

from kvlm.data import shapes


def test_generation_is_deterministic():
    a = shapes.generate(20, seed=7)
    b = shapes.generate(20, seed=7)
    c = shapes.generate(20, seed=8)
    assert [e.question for e in a] == [e.question for e in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_answers_follow_from_the_drawn_objects():
    for example in shapes.generate(300, seed=11):
        objects = example.extra["objects"]
        q, answer = example.question, example.answer
        assert example.image.shape == (32, 32, 3) and example.image.dtype == np.uint8
        if q.startswith("what color is the "):
            shape = q.rsplit(" ", 1)[1]
            assert answer == next(o["color"] for o in objects if o["shape"] == shape)
        elif q.startswith("how many"):
            assert answer == shapes.COUNTS[len(objects) - 1]
        elif q.startswith("is there a "):
            color, shape = q.split()[-2:]
            present = any(o["color"] == color and o["shape"] == shape for o in objects)
            assert answer == ("yes" if present else "no")
        elif q.startswith("where is the "):
            shape = q.rsplit(" ", 1)[1]
            assert answer == next(o["position"] for o in objects if o["shape"] == shape)
        assert answer in shapes.ANSWERS
        assert all(o["color"] in example.caption for o in objects)


def test_all_question_types_and_answers_occur():
    examples = shapes.generate(600, seed=1)
    assert {e.answer for e in examples} == set(shapes.ANSWERS)
    # Objects are drawn in their colour in their slot.
    example = next(e for e in examples if len(e.extra["objects"]) == 1)
    obj = example.extra["objects"][0]
    slot = shapes.POSITIONS.index(obj["position"])
    region = example.image[:, slot * 10 : slot * 10 + 11].reshape(-1, 3).astype(int)
    target = np.array(shapes.COLORS[obj["color"]])
    assert (np.abs(region - target).sum(axis=1) < 60).sum() >= 5
