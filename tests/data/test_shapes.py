import re
from collections import Counter

import numpy as np
import pytest

from kvlm.data import shapes

pytestmark = pytest.mark.backend_independent


# One pattern per question type, capturing the attributes that name the object asked about.
QUESTION_PATTERNS = {
    "color": re.compile(r"what color is the (?P<shape>\w+)"),
    "shape": re.compile(r"what shape is the (?P<color>\w+) object"),
    "position": re.compile(r"where is the (?P<shape>\w+)"),
    "size": re.compile(r"what size is the (?P<color>\w+) (?P<shape>\w+)"),
    "count": re.compile(r"how many shapes are there"),
    "exists": re.compile(r"is there a (?P<color>\w+) (?P<shape>\w+)"),
}


def _parse(question: str) -> tuple[str, dict]:
    """`(question type, {attribute: value})` of a generated question; exactly one pattern matches."""
    matches = [(kind, match.groupdict()) for kind, p in QUESTION_PATTERNS.items() if (match := p.fullmatch(question))]
    assert len(matches) == 1, (question, matches)
    return matches[0]


def _answer_from_scene(kind: str, named: dict, objects: list[dict]) -> str:
    """The answer to a question of type `kind` about the object it names, read off the drawn objects."""
    if kind == "count":
        return shapes.COUNTS[len(objects) - 1]
    matching = [o for o in objects if all(o[key] == value for key, value in named.items())]
    if kind == "exists":
        return "yes" if matching else "no"
    assert len(matching) == 1, (kind, named, objects)  # the question names exactly one object
    return matching[0][kind]


def test_generation_is_deterministic():
    a = shapes.generate(20, seed=7)
    b = shapes.generate(20, seed=7)
    c = shapes.generate(20, seed=8)
    assert [e.question for e in a] == [e.question for e in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_every_question_types_answer_follows_from_the_scene():
    examples = shapes.generate(600, seed=11)
    kinds = Counter()
    for example in examples:
        objects = example.extra["objects"]
        assert example.image.shape == (32, 32, 3) and example.image.dtype == np.uint8
        assert 1 <= len(objects) <= 3
        for attribute in ("shape", "color", "position"):
            assert len({o[attribute] for o in objects}) == len(objects), objects  # distinct within a scene
        kind, named = _parse(example.question)
        assert example.answer == _answer_from_scene(kind, named, objects), (example.question, objects)
        assert example.answer in shapes.ANSWERS
        assert example.caption == shapes.caption_for(objects)
        kinds[kind, example.answer == "no"] += 1
    # Every question type occurs (about 100 each), and existence questions are asked both ways.
    assert {kind for kind, _ in kinds} == set(shapes.QUESTION_TYPES)
    assert min(n for (kind, _), n in kinds.items() if kind != "exists") > 60, kinds
    assert kinds["exists", True] > 20 and kinds["exists", False] > 20, kinds


def test_all_answers_occur_and_objects_are_drawn_in_their_slot():
    examples = shapes.generate(600, seed=1)
    assert {e.answer for e in examples} == set(shapes.ANSWERS)
    example = next(e for e in examples if len(e.extra["objects"]) == 1)
    obj = example.extra["objects"][0]
    slot = shapes.POSITIONS.index(obj["position"])
    region = example.image[:, slot * 10 : slot * 10 + 11].reshape(-1, 3).astype(int)
    target = np.array(shapes.COLORS[obj["color"]])
    assert (np.abs(region - target).sum(axis=1) < 60).sum() >= 5
    # Nothing of that colour is drawn in the other slots.
    for other in set(range(3)) - {slot}:
        region = example.image[:, other * 11 : other * 11 + 10].reshape(-1, 3).astype(int)
        assert (np.abs(region - target).sum(axis=1) < 60).sum() == 0
