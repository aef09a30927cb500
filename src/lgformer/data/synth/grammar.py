"""The referring grammar of the synthetic benchmark: descriptions, their wording, a parser and an interpreter.

A description names a shape with optional attributes (size, colour, pattern), optional negated attributes
("that is not striped"), optional spatial relations to other objects ("left of the large blue ring") and an
optional ordinal ("the second star from the left"). Its level is its construct:

  1  shape only ("star")                                   -> 1-2 words
  2  attributes ("the small red star")                     -> 3-7 words
  3  one spatial relation ("the red star left of the ring") -> 8-12 words
  4  ordinal, negation or two relations, composed          -> 13-18 words

Every word of the vocabulary is one bert-base-uncased wordpiece and there is no punctuation, so an 18-word
expression plus [CLS]/[SEP] fits the 20-token limit untruncated.

The interpreter works on the text (`parse`, then `resolve` over the scene graph) and is three-valued: a
relation is true, false or unclear (objects at an oblique angle), an ordinal is unclear when the ranked
objects are not clearly apart, and an ordinal must pick the same object whether it counts before or after
the other clauses filter. An expression is accepted only if exactly one object is clearly described and every
other object is clearly not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "heart")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "large")
PATTERNS = ("plain", "striped", "dotted", "checked")
ATTRIBUTES = ("size", "color", "pattern")  # adjective order in the wording
RELATIONS = ("left", "right", "above", "below")
DIRECTIONS = ("left", "right", "top", "bottom")
ORDINALS = ("first", "second", "third", "fourth")
WORD_RANGES = {1: (1, 2), 2: (3, 7), 3: (8, 12), 4: (13, 18)}  # the paper's buckets; 18 fits 20 tokens

SHAPE_WORDS = {s: (s,) for s in SHAPES} | {"circle": ("circle", "disc"), "cross": ("cross", "plus")}
ATTRIBUTE_WORDS = {
    "size": {"small": ("small", "little"), "large": ("large", "big")},
    "color": {c: (c,) for c in COLORS},
    "pattern": {
        "plain": ("plain", "solid"),
        "striped": ("striped",),
        "dotted": ("dotted", "spotted"),
        "checked": ("checked",),
    },
}
PATTERN_NOUNS = {"striped": ("stripes",), "dotted": ("dots", "spots"), "checked": ("checks",)}
RELATION_WORDS = {
    "left": (("left", "of"), ("to", "the", "left", "of")),
    "right": (("right", "of"), ("to", "the", "right", "of")),
    "above": (("above",),),
    "below": (("below",), ("under",), ("beneath",)),
}

# geometry of the three-valued relations and ordinals
CLEAR_ANGLE = 35.0  # degrees off the relation's axis: up to here "true"
FALSE_ANGLE = 65.0  # from here on "false"; in between "unclear"
CLEAR_ALONG = 0.5  # "true" also needs the centres this far apart along the axis, in units of r1 + r2
ORDINAL_GAP = 0.75  # ranked neighbours must be this far apart along the direction, in units of r1 + r2

YES, UNCLEAR, NO = 1.0, 0.5, 0.0


@dataclass(frozen=True)
class Obj:
    """One object of a scene graph: its attributes and its geometry (centre and radius, in pixels)."""

    shape: str
    color: str
    size: str
    pattern: str
    cx: float
    cy: float
    r: float

    def attribute(self, name: str) -> str:
        return getattr(self, name)


@dataclass(frozen=True)
class Desc:
    shape: str
    attrs: tuple[tuple[str, str], ...] = ()  # (attribute, value), e.g. ("color", "red")
    negations: tuple[tuple[str, str], ...] = ()
    relations: tuple[tuple[str, Desc], ...] = ()  # (relation, landmark); landmarks have attrs only
    ordinal: tuple[int, str] | None = None  # (k >= 1, direction)


def level(desc: Desc) -> int:
    if desc.ordinal is not None or desc.negations or len(desc.relations) >= 2:
        return 4
    if desc.relations:
        return 3
    return 2 if desc.attrs else 1


class GrammarError(ValueError):
    """The text is not a sentence of the grammar."""


# ------------------------------------------------------------------------------------------------ wording


def render(desc: Desc, rng: np.random.Generator) -> str:
    """One wording of `desc`, with random synonyms, pattern placement, relation phrases and connectors."""
    words: list[str] = []
    if desc.ordinal is not None:
        words += ["the", ORDINALS[desc.ordinal[0] - 1]]
        words += _noun_phrase(desc.shape, desc.attrs, rng, allow_with=False)
        words += ["from", "the", desc.ordinal[1]]
    else:
        if desc.attrs or desc.negations or desc.relations or rng.random() < 0.5:
            words.append("the")
        words += _noun_phrase(desc.shape, desc.attrs, rng, allow_with=True)
    clauses: list[tuple[str, object]] = [("not", n) for n in desc.negations] + list(desc.relations)
    order = rng.permutation(len(clauses))
    for position, k in enumerate(order):
        kind, value = clauses[k]
        if position > 0:
            words.append("and")
        if kind == "not":
            attr, val = value  # type: ignore[misc]
            words += (["is"] if position > 0 else [_pick(rng, ("that", "which")), "is"]) + ["not"]
            words.append(_pick(rng, ATTRIBUTE_WORDS[attr][val]))
        else:
            if position == 0 and (desc.negations or desc.ordinal is not None or rng.random() < 0.5):
                words += [_pick(rng, ("that", "which")), "is"]
            words += list(_pick(rng, RELATION_WORDS[kind]))
            landmark: Desc = value  # type: ignore[assignment]
            words += ["the", *_noun_phrase(landmark.shape, landmark.attrs, rng, allow_with=False)]
    return " ".join(words)


def _noun_phrase(
    shape: str, attrs: Sequence[tuple[str, str]], rng: np.random.Generator, allow_with: bool
) -> list[str]:
    values = dict(attrs)
    pattern = values.get("pattern")
    with_noun = allow_with and pattern in PATTERN_NOUNS and rng.random() < 0.4
    words = [
        _pick(rng, ATTRIBUTE_WORDS[a][values[a]])
        for a in ATTRIBUTES
        if a in values and not (a == "pattern" and with_noun)
    ]
    words.append(_pick(rng, SHAPE_WORDS[shape]))
    if with_noun:
        words += ["with", _pick(rng, PATTERN_NOUNS[pattern])]
    return words


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------------------------------ parsing

_SHAPE_OF = {w: s for s, words in SHAPE_WORDS.items() for w in words}
_ADJECTIVE_OF = {
    w: (a, v) for a, table in ATTRIBUTE_WORDS.items() for v, words in table.items() for w in words
}
_PATTERN_NOUN_OF = {w: v for v, words in PATTERN_NOUNS.items() for w in words}
_RELATION_PHRASES = sorted(
    ((phrase, rel) for rel, phrases in RELATION_WORDS.items() for phrase in phrases), key=lambda p: -len(p[0])
)


def vocabulary() -> set[str]:
    """Every word the grammar can produce (each is one bert-base-uncased wordpiece)."""
    words = {"the", "a", "from", "that", "which", "is", "not", "and", "with", *ORDINALS, *DIRECTIONS}
    words |= set(_SHAPE_OF) | set(_ADJECTIVE_OF) | set(_PATTERN_NOUN_OF)
    return words | {w for phrase, _ in _RELATION_PHRASES for w in phrase}


def parse(text: str) -> Desc:
    """The description a sentence of the grammar denotes; GrammarError for anything else."""
    parser = _Parser(text.lower().split())
    desc = parser.expression()
    if parser.pos != len(parser.words):
        raise GrammarError(f"unexpected {parser.words[parser.pos]!r} in {text!r}")
    return desc


class _Parser:
    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.pos = 0

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def take(self, *options: str) -> str | None:
        word = self.peek()
        if word is not None and word in options:
            self.pos += 1
            return word
        return None

    def expect(self, *options: str) -> str:
        word = self.take(*options)
        if word is None:
            raise GrammarError(
                f"expected {' or '.join(options)} at word {self.pos + 1} of {' '.join(self.words)!r}"
            )
        return word

    def expression(self) -> Desc:
        self.take("the", "a")
        word = self.take(*ORDINALS)
        shape, attrs = self.noun_phrase()
        ordinal = None
        if word is not None:
            self.expect("from")
            self.expect("the")
            ordinal = (ORDINALS.index(word) + 1, self.expect(*DIRECTIONS))
        negations: list[tuple[str, str]] = []
        relations: list[tuple[str, Desc]] = []
        first = True
        while self.peek() is not None:
            if not first:
                self.expect("and")
            self.take("that", "which")
            self.take("is")
            if self.take("not"):
                word = self.expect(*_ADJECTIVE_OF)
                negations.append(_ADJECTIVE_OF[word])
            else:
                relation = self.relation()
                self.expect("the")
                relations.append((relation, Desc(*self.noun_phrase())))
            first = False
        # clauses are a conjunction: keep them in a canonical order, whatever the wording's order
        negations.sort(key=lambda n: (ATTRIBUTES.index(n[0]), n[1]))
        relations.sort(key=lambda r: (RELATIONS.index(r[0]), r[1].shape, r[1].attrs))
        return Desc(shape, attrs, tuple(negations), tuple(relations), ordinal)

    def noun_phrase(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        values: dict[str, str] = {}
        while self.peek() in _ADJECTIVE_OF:
            attr, value = _ADJECTIVE_OF[self.expect(*_ADJECTIVE_OF)]
            if attr in values:
                raise GrammarError(f"two {attr} words")
            values[attr] = value
        shape = _SHAPE_OF[self.expect(*_SHAPE_OF)]
        if self.take("with"):
            if "pattern" in values:
                raise GrammarError("two pattern words")
            values["pattern"] = _PATTERN_NOUN_OF[self.expect(*_PATTERN_NOUN_OF)]
        return shape, tuple((a, values[a]) for a in ATTRIBUTES if a in values)

    def relation(self) -> str:
        for phrase, relation in _RELATION_PHRASES:
            if tuple(self.words[self.pos : self.pos + len(phrase)]) == phrase:
                self.pos += len(phrase)
                return relation
        raise GrammarError(f"expected 'not' or a relation at word {self.pos + 1} of {' '.join(self.words)!r}")


# -------------------------------------------------------------------------------------------- interpreter

_AXES = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}


def relation_value(obj: Obj, landmark: Obj, relation: str) -> float:
    """Is `obj` <relation> `landmark`? YES, NO or UNCLEAR, from the angle and distance of the centres."""
    if obj is landmark:
        return NO
    ux, uy = _AXES[relation]
    dx, dy = obj.cx - landmark.cx, obj.cy - landmark.cy
    along = dx * ux + dy * uy
    if along <= 0:
        return NO
    angle = math.degrees(math.atan2(abs(dx * uy - dy * ux), along))
    if angle >= FALSE_ANGLE:
        return NO
    if angle <= CLEAR_ANGLE and along >= CLEAR_ALONG * (obj.r + landmark.r):
        return YES
    return UNCLEAR


def matches(obj: Obj, shape: str, attrs: Sequence[tuple[str, str]]) -> bool:
    return obj.shape == shape and all(obj.attribute(a) == v for a, v in attrs)


def truth(desc: Desc, objs: Sequence[Obj]) -> list[float] | None:
    """Three-valued truth of `desc` without its ordinal, per object; None if a landmark is not unique."""
    values = [YES if matches(o, desc.shape, desc.attrs) else NO for o in objs]
    for attr, value in desc.negations:
        values = [v if o.attribute(attr) != value else NO for v, o in zip(values, objs)]
    for relation, landmark_desc in desc.relations:
        landmark = resolve(landmark_desc, objs)
        if landmark is None:
            return None
        values = [min(v, relation_value(o, objs[landmark], relation)) for v, o in zip(values, objs)]
    return values


def _unique(values: Sequence[float]) -> int | None:
    if any(v == UNCLEAR for v in values):
        return None
    chosen = [i for i, v in enumerate(values) if v == YES]
    return chosen[0] if len(chosen) == 1 else None


def rank(candidates: Sequence[int], objs: Sequence[Obj], direction: str, k: int) -> int | None:
    """The k-th candidate counted from `direction`, or None if there is none or the count is unclear."""
    sign, coord = {"left": (1, "cx"), "right": (-1, "cx"), "top": (1, "cy"), "bottom": (-1, "cy")}[direction]
    ordered = sorted(candidates, key=lambda i: sign * getattr(objs[i], coord))
    if k > len(ordered):
        return None
    for a, b in zip(ordered[:k], ordered[1 : k + 1]):
        gap = abs(getattr(objs[a], coord) - getattr(objs[b], coord))
        if gap < ORDINAL_GAP * (objs[a].r + objs[b].r):
            return None
    return ordered[k - 1]


def resolve(desc: Desc, objs: Sequence[Obj]) -> int | None:
    """The index of the one object `desc` clearly describes, or None (none, several, or unclear)."""
    values = truth(desc, objs)
    if values is None:
        return None
    if desc.ordinal is None:
        return _unique(values)
    k, direction = desc.ordinal
    if any(v == UNCLEAR for v in values):
        return None
    # the ordinal counts among the objects that pass every clause ...
    filtered = rank([i for i, v in enumerate(values) if v == YES], objs, direction, k)
    # ... or among the objects of the noun phrase, the clauses then describing the one counted; both
    # readings must agree
    counted = rank([i for i, o in enumerate(objs) if matches(o, desc.shape, desc.attrs)], objs, direction, k)
    return filtered if filtered is not None and filtered == counted else None


def min_level(target: int, objs: Sequence[Obj]) -> int:
    """The lowest level at which some description identifies `target` (4 if levels 1-3 cannot)."""
    obj = objs[target]
    if resolve(Desc(obj.shape), objs) == target:
        return 1
    full = tuple((a, obj.attribute(a)) for a in ATTRIBUTES)
    if resolve(Desc(obj.shape, full), objs) == target:
        return 2
    for j in unique_landmarks(objs):
        if j == target:
            continue
        for relation in RELATIONS:
            if resolve(Desc(obj.shape, full, relations=((relation, full_desc(objs[j])),)), objs) == target:
                return 3
    return 4


def full_desc(obj: Obj) -> Desc:
    return Desc(obj.shape, tuple((a, obj.attribute(a)) for a in ATTRIBUTES))


def unique_landmarks(objs: Sequence[Obj]) -> list[int]:
    """Objects a level-1/2 description can name (no twin with the same shape and attributes)."""
    return [j for j, o in enumerate(objs) if resolve(full_desc(o), objs) == j]
