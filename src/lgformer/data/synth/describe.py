"""Referring expressions for one object of a scene, at a given level, verified on their text.

Candidates are drawn at random from the constructs of the level, with attribute values, relations and
ordinals that hold for the target; each is worded, and kept only if its wording has the level's word count
and, parsed back from the text, resolves to the target and to nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lgformer.data.synth.grammar import (
    ATTRIBUTE_WORDS,
    ATTRIBUTES,
    DIRECTIONS,
    RELATIONS,
    WORD_RANGES,
    YES,
    Desc,
    Obj,
    level,
    matches,
    parse,
    rank,
    relation_value,
    render,
    resolve,
    unique_landmarks,
)

TRIES = {1: 8, 2: 16, 3: 40, 4: 60}
L4_TEMPLATES = (
    ("ordinal", "relation"),
    ("ordinal", "negation", "relation"),
    ("relation", "relation"),
    ("negation", "relation", "relation"),
    ("ordinal", "negation"),
    ("ordinal", "relation", "relation"),
)


def describe(
    target: int, objs: Sequence[Obj], lvl: int, rng: np.random.Generator, count: int = 3
) -> list[str]:
    """Up to `count` distinct verified expressions of level `lvl` for `objs[target]`."""
    context = _Context(target, objs)
    texts: list[str] = []
    for _ in range(TRIES[lvl]):
        desc = context.candidate(lvl, rng)
        if desc is None:
            continue
        text = render(desc, rng)
        if text not in texts and verify(text, target, objs, lvl):
            texts.append(text)
            if len(texts) == count:
                break
    return texts


def verify(text: str, target: int, objs: Sequence[Obj], lvl: int) -> bool:
    """The text parses, has the level's construct and word count, and picks exactly `target`."""
    low, high = WORD_RANGES[lvl]
    if not low <= len(text.split()) <= high:
        return False
    desc = parse(text)
    return level(desc) == lvl and resolve(desc, objs) == target


class _Context:
    def __init__(self, target: int, objs: Sequence[Obj]) -> None:
        self.target, self.objs = target, objs
        self.obj = objs[target]
        self.landmarks = [j for j in unique_landmarks(objs) if j != target]
        self.true_relations = [
            (rel, j)
            for j in self.landmarks
            for rel in RELATIONS
            if relation_value(self.obj, objs[j], rel) == YES
        ]

    def attrs(
        self, rng: np.random.Generator, p: float, obj: Obj | None = None
    ) -> tuple[tuple[str, str], ...]:
        obj = obj or self.obj
        return tuple((a, obj.attribute(a)) for a in ATTRIBUTES if rng.random() < p)

    def landmark(self, j: int, rng: np.random.Generator) -> Desc:
        """A description naming landmark j alone: a random attribute subset, widened until it is unique."""
        obj = self.objs[j]
        attrs = list(self.attrs(rng, 0.4, obj))
        for a in rng.permutation(len(ATTRIBUTES)):
            if resolve(Desc(obj.shape, tuple(attrs)), self.objs) == j:
                break
            pair = (ATTRIBUTES[a], obj.attribute(ATTRIBUTES[a]))
            if pair not in attrs:
                attrs.append(pair)
        return Desc(obj.shape, tuple(sorted(attrs, key=lambda p: ATTRIBUTES.index(p[0]))))

    def relations(self, n: int, rng: np.random.Generator) -> tuple[tuple[str, Desc], ...] | None:
        if len(self.true_relations) < n:
            return None
        picks = rng.choice(len(self.true_relations), size=n, replace=False)
        return tuple(
            (self.true_relations[k][0], self.landmark(self.true_relations[k][1], rng)) for k in picks
        )

    def negation(self, rng: np.random.Generator) -> tuple[tuple[str, str], ...]:
        """Negate a value some other object of the same shape has (informative), else any other value."""
        attr = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
        own = self.obj.attribute(attr)
        others = sorted({o.attribute(attr) for o in self.objs if o.shape == self.obj.shape} - {own})
        values = others or sorted(set(ATTRIBUTE_WORDS[attr]) - {own})
        return ((attr, values[int(rng.integers(len(values)))]),)

    def ordinal(self, attrs: tuple[tuple[str, str], ...], rng: np.random.Generator) -> tuple[int, str] | None:
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        candidates = [i for i, o in enumerate(self.objs) if matches(o, self.obj.shape, attrs)]
        for k in range(1, 5):
            if rank(candidates, self.objs, direction, k) == self.target:
                return k, direction
        return None

    def candidate(self, lvl: int, rng: np.random.Generator) -> Desc | None:
        shape = self.obj.shape
        if lvl == 1:
            return Desc(shape)
        if lvl == 2:
            attrs = self.attrs(rng, 0.5)
            if not attrs:
                one = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
                attrs = ((one, self.obj.attribute(one)),)
            return Desc(shape, attrs)
        if lvl == 3:
            relations = self.relations(1, rng)
            return None if relations is None else Desc(shape, self.attrs(rng, 0.5), relations=relations)
        template = L4_TEMPLATES[int(rng.integers(len(L4_TEMPLATES)))]
        attrs = self.attrs(rng, 0.5)
        relations = self.relations(template.count("relation"), rng) if "relation" in template else ()
        ordinal = self.ordinal(attrs, rng) if "ordinal" in template else None
        if relations is None or ("ordinal" in template and ordinal is None):
            return None
        negations = self.negation(rng) if "negation" in template else ()
        return Desc(shape, attrs, negations, relations, ordinal)
