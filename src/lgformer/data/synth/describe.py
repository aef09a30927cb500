"""Referring expressions for one object of a scene, at a given level, verified on their text.

Candidates are drawn at random from the constructs of the level, with attribute values, relations and
ordinals that hold for the target; each is worded, and kept only if its wording has the level's word count
and, parsed back from the text, resolves to the target and to nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from lgformer.data.synth.grammar import (
    ALL,
    ANY_SHAPE,
    ATTRIBUTES,
    COUNT_WORDS,
    DIRECTIONS,
    RELATIONS,
    SYNTH_LEXICON,
    YES,
    Desc,
    Lexicon,
    Obj,
    level,
    matches,
    parse,
    rank,
    relation_value,
    render,
    resolve,
    resolve_set,
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
    target: int,
    objs: Sequence[Obj],
    lvl: int,
    rng: np.random.Generator,
    count: int = 3,
    lex: Lexicon = SYNTH_LEXICON,
) -> list[str]:
    """Up to `count` distinct verified expressions of level `lvl` for `objs[target]`."""
    context = _Context(target, objs, lex)
    return _verified(lambda: context.candidate(lvl, rng), (target,), objs, lvl, rng, count, TRIES[lvl], lex)


def _verified(
    make: Callable[[], Desc | None],
    members: tuple[int, ...],
    objs: Sequence[Obj],
    lvl: int,
    rng: np.random.Generator,
    count: int,
    tries: int,
    lex: Lexicon,
) -> list[str]:
    """Up to `count` distinct wordings, over `tries` descriptions from `make` (None: no candidate this try),
    that `verify_set` accepts for `members`."""
    texts: list[str] = []
    for _ in range(tries):
        desc = make()
        if desc is None:
            continue
        text = render(desc, rng, lex)
        if text not in texts and verify_set(text, members, objs, lvl, lex):
            texts.append(text)
            if len(texts) == count:
                break
    return texts


def spoken_attrs(
    obj: Obj, rng: np.random.Generator, p: float, lex: Lexicon, skip: str | None = None
) -> tuple[tuple[str, str], ...]:
    """Each attribute of `obj` the lexicon can say (but `skip`), drawn with probability `p`."""
    return tuple(
        (a, obj.attribute(a))
        for a in ATTRIBUTES
        if a != skip and rng.random() < p and lex.worded(a, obj.attribute(a))
    )


class _Context:
    def __init__(self, target: int, objs: Sequence[Obj], lex: Lexicon) -> None:
        self.target, self.objs, self.lex = target, objs, lex
        self.obj = objs[target]
        self.landmarks = [j for j in unique_landmarks(objs, lex) if j != target]
        self.true_relations = [
            (rel, j)
            for j in self.landmarks
            for rel in RELATIONS
            if relation_value(self.obj, objs[j], rel) == YES
        ]

    def attrs(
        self, rng: np.random.Generator, p: float, obj: Obj | None = None
    ) -> tuple[tuple[str, str], ...]:
        return spoken_attrs(obj or self.obj, rng, p, self.lex)

    def landmark(self, j: int, rng: np.random.Generator) -> Desc:
        """A description naming landmark j alone: a random attribute subset, widened until it is unique."""
        obj = self.objs[j]
        attrs = list(self.attrs(rng, 0.4, obj))
        for a in rng.permutation(len(ATTRIBUTES)):
            if resolve(Desc(obj.shape, tuple(attrs)), self.objs) == j:
                break
            pair = (ATTRIBUTES[a], obj.attribute(ATTRIBUTES[a]))
            if pair not in attrs and self.lex.worded(*pair):
                attrs.append(pair)
        return Desc(obj.shape, tuple(sorted(attrs, key=lambda p: ATTRIBUTES.index(p[0]))))

    def relations(self, n: int, rng: np.random.Generator) -> tuple[tuple[str, Desc], ...] | None:
        if len(self.true_relations) < n:
            return None
        picks = rng.choice(len(self.true_relations), size=n, replace=False)
        return tuple(
            (self.true_relations[k][0], self.landmark(self.true_relations[k][1], rng)) for k in picks
        )

    def negation(self, rng: np.random.Generator) -> tuple[tuple[str, str], ...] | None:
        """Negate a value some other object of the same shape has (informative), else any other value."""
        attr = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
        own = self.obj.attribute(attr)
        if not self.lex.worded(attr, own):
            return None
        others = {o.attribute(attr) for o in self.objs if o.shape == self.obj.shape} - {own}
        values = sorted(v for v in others if self.lex.worded(attr, v))
        if self.lex.negate_absent:
            values = values or sorted(set(self.lex.attribute_words[attr]) - {own})
        return ((attr, values[int(rng.integers(len(values)))]),) if values else None

    def ordinal(
        self, attrs: tuple[tuple[str, str], ...], rng: np.random.Generator, most: int = 4
    ) -> tuple[int, str] | None:
        """The first count up to `most` from a random side that picks the target."""
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        candidates = [i for i, o in enumerate(self.objs) if matches(o, self.obj.shape, attrs)]
        for k in range(1, most + 1):
            if self.lex.is_superlative((k, direction)) and len(candidates) < 2:
                continue  # "the dog on the left" says there is another dog
            if rank(candidates, self.objs, direction, k) == self.target:
                return k, direction
        return None

    def candidate(self, lvl: int, rng: np.random.Generator) -> Desc | None:
        shape = self.obj.shape
        if lvl == 1:
            return Desc(shape)
        if lvl == 2:
            attrs = self.attrs(rng, 0.5)
            if self.lex.superlatives and rng.random() < 0.5:
                ordinal = self.ordinal(attrs, rng, most=1)
                return None if ordinal is None else Desc(shape, attrs, ordinal=ordinal)
            if not attrs:
                one = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
                if not self.lex.worded(one, self.obj.attribute(one)):
                    return None
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
        if negations is None:
            return None
        return Desc(shape, attrs, negations, relations, ordinal)


# ------------------------------------------------------------------ generalized: several objects, or none


def describe_plural(
    objs: Sequence[Obj],
    rng: np.random.Generator,
    count: int = 3,
    lex: Lexicon = SYNTH_LEXICON,
    named: int | None = None,
    at_least: int = 2,
) -> tuple[tuple[int, ...], list[str]] | None:
    """A set of two or more objects that one plural description names, with up to `count` verified
    expressions of it ("both triangles", "the two striped circles", "all the red shapes"), or None. Only the
    objects before `named` may be in the set (default all): those after it are in the picture without a mask
    of their own (a crowd, a speck), so "all the people" is never said where they would belong to it. A set
    needs `at_least` wordings."""
    plurals = lex.plurals or {}
    for _ in range(TRIES[2]):
        example = objs[int(rng.integers(len(objs) if named is None else named))]
        if example.shape not in plurals:
            continue  # a noun without a plural ("skis")
        attrs = spoken_attrs(example, rng, 0.4, lex)
        shape = ANY_SHAPE if attrs and ANY_SHAPE in plurals and rng.random() < 0.3 else example.shape
        members = resolve_set(Desc(shape, attrs, count=ALL), objs)
        if members is None or (named is not None and max(members) >= named):
            continue
        counts = [ALL] + ([len(members)] if len(members) in COUNT_WORDS else [])

        def make(shape: str = shape, attrs: tuple = attrs, counts: list[int] = counts) -> Desc:
            return Desc(shape, attrs, count=counts[int(rng.integers(len(counts)))])

        lvl = level(Desc(shape, attrs, count=ALL), lex)  # the count's wording leaves the level as it is
        texts = _verified(make, members, objs, lvl, rng, count, 2 * count, lex)
        if len(texts) >= at_least:
            return members, texts
    return None


def describe_absent(
    objs: Sequence[Obj],
    rng: np.random.Generator,
    count: int = 3,
    lex: Lexicon = SYNTH_LEXICON,
    swaps: Mapping[str, Sequence[str]] | None = None,
    named: int | None = None,
    at_least: int = 2,
) -> list[str] | None:
    """Up to `count` verified expressions that name nothing in the scene but come close: an object there
        shares all of the description but one attribute ("the green star" where the star is red and nothing
        green is a star), or, where `swaps` gives a noun other nouns absent from the scene, all but its noun
        ("the white cat" beside a white dog, no cat in the picture). Only objects before `named` are the near
        one; the others still count when the interpreter checks that nothing fits. None when no description
    with `at_least` wordings is found."""
    for _ in range(TRIES[2]):
        near = objs[int(rng.integers(len(objs) if named is None else named))]
        if swaps and swaps.get(near.shape) and rng.random() < 0.5:
            nouns = swaps[near.shape]
            desc = Desc(nouns[int(rng.integers(len(nouns)))], spoken_attrs(near, rng, 0.5, lex))
        else:
            attr = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
            own = near.attribute(attr)
            others = sorted(set(lex.attribute_words[attr]) - {own} - lex.confusable.get(own, frozenset()))
            if not others:
                continue
            changed = (attr, others[int(rng.integers(len(others)))])
            kept = spoken_attrs(near, rng, 0.4, lex, skip=attr)
            desc = Desc(near.shape, tuple(sorted([*kept, changed], key=lambda p: ATTRIBUTES.index(p[0]))))
        if resolve_set(desc, objs) != ():
            continue
        lvl = level(desc, lex)
        texts = _verified(lambda desc=desc: desc, (), objs, lvl, rng, count, 2 * count, lex)
        if len(texts) >= at_least:
            return texts
    return None


def verify_set(
    text: str, members: tuple[int, ...], objs: Sequence[Obj], lvl: int, lex: Lexicon = SYNTH_LEXICON
) -> bool:
    """The text parses, has the level's word count, and names exactly the objects `members` (none: `()`)."""
    low, high = lex.word_ranges[lvl]
    if not low <= len(text.split()) <= high:
        return False
    desc = parse(text, lex)
    return level(desc, lex) == lvl and resolve_set(desc, objs) == members
