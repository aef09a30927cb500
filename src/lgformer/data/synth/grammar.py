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

Plural descriptions name a set of two or more objects ("both triangles", "the two striped circles", "all
the red shapes": `Desc.count`), and `resolve_set` also says when a singular description names nothing in the
scene (the generalized benchmark's plural and absent expressions).

The interpreter works on the text (`parse`, then `resolve` over the scene graph) and is three-valued: a
relation is true, false or unclear (objects at an oblique angle), an ordinal is unclear when the ranked
objects are not clearly apart, and an ordinal must pick the same object whether it counts before or after
the other clauses filter. An expression is accepted only if exactly one object is clearly described and every
other object is clearly not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
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

SUPERLATIVE_PREFIXES = {
    "left": ("leftmost", "left"),
    "right": ("rightmost", "right"),
    "top": ("top",),
    "bottom": ("bottom",),
}
SUPERLATIVE_SUFFIXES = {
    "left": ("on", "the", "left"),
    "right": ("on", "the", "right"),
    "top": ("at", "the", "top"),
    "bottom": ("at", "the", "bottom"),
}
UNKNOWN = "?"  # an attribute value the pixels do not settle: a description using it is unclear
PLURAL_WORDS = {s: (s + "s",) for s in SHAPES} | {"circle": ("circles", "discs"), "cross": ("crosses",)}
ANY_SHAPE = "shape"  # plural only, with an attribute: "all the red shapes" names objects of every shape
PLURAL_WORDS[ANY_SHAPE] = ("shapes", "objects")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
ALL = 0  # Desc.count of "all the ...": every object that fits, two or more


@dataclass(frozen=True)
class Lexicon:
    """The words of one world: nouns (a wording may be several words), adjectives per attribute value,
    pattern nouns ("with stripes"), the word count of each level, and two constructs real photos need:
    superlatives ("the leftmost car", "the dog on the left": the first from a side, a level-2 attribute) and
    colours worded after some nouns ("the person in red")."""

    nouns: Mapping[str, tuple[str, ...]]
    attribute_words: Mapping[str, Mapping[str, tuple[str, ...]]]
    pattern_nouns: Mapping[str, tuple[str, ...]]
    word_ranges: Mapping[int, tuple[int, int]]
    superlatives: bool = False
    color_after: frozenset[str] = frozenset()
    negate_absent: bool = True  # negate a value no other object of the noun has ("that is not purple")
    plurals: Mapping[str, tuple[str, ...]] | None = None  # plural nouns: the grammar's plural descriptions
    # values an absent description never gives an object that has the key value (white ~ gray on a photo)
    confusable: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    def worded(self, attr: str, value: str) -> bool:
        """Can the value be said? (UNKNOWN and values without words, such as a middle size, cannot.)"""
        return value in self.attribute_words.get(attr, {})

    def is_superlative(self, ordinal: tuple[int, str] | None) -> bool:
        return self.superlatives and ordinal is not None and ordinal[0] == 1


# geometry of the three-valued relations and ordinals
CLEAR_ANGLE = 35.0  # degrees off the relation's axis: up to here "true"
FALSE_ANGLE = 65.0  # from here on "false"; in between "unclear"
CLEAR_ALONG = 0.5  # "true" also needs the centres this far apart along the axis, in units of r1 + r2
ORDINAL_GAP = 0.75  # ranked neighbours must be this far apart along the direction, in units of r1 + r2

YES, UNCLEAR, NO = 1.0, 0.5, 0.0

SYNTH_LEXICON = Lexicon(SHAPE_WORDS, ATTRIBUTE_WORDS, PATTERN_NOUNS, WORD_RANGES, plurals=PLURAL_WORDS)


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
    count: int | None = None  # plural: ALL or exactly k >= 2 objects; None: one object


def level(desc: Desc, lex: Lexicon = SYNTH_LEXICON) -> int:
    if desc.count is not None:
        return 2 if desc.attrs else 1
    superlative = lex.is_superlative(desc.ordinal)
    if (desc.ordinal is not None and not superlative) or desc.negations or len(desc.relations) >= 2:
        return 4
    if desc.relations:
        return 3
    return 2 if desc.attrs or superlative else 1


class GrammarError(ValueError):
    """The text is not a sentence of the grammar."""


# ------------------------------------------------------------------------------------------------ wording


def render(desc: Desc, rng: np.random.Generator, lex: Lexicon = SYNTH_LEXICON) -> str:
    """One wording of `desc`, with random synonyms, pattern placement, relation phrases and connectors."""
    if desc.count is not None:
        return _render_plural(desc, rng, lex)
    words: list[str] = []
    if lex.is_superlative(desc.ordinal):
        direction = desc.ordinal[1]  # type: ignore[index]
        words.append("the")
        if rng.random() < 0.5:
            words.append(_pick(rng, SUPERLATIVE_PREFIXES[direction]))
            words += _noun_phrase(desc.shape, desc.attrs, rng, False, lex)
        else:
            words += _noun_phrase(desc.shape, desc.attrs, rng, False, lex)
            words += SUPERLATIVE_SUFFIXES[direction]
    elif desc.ordinal is not None:
        words += ["the", ORDINALS[desc.ordinal[0] - 1]]
        words += _noun_phrase(desc.shape, desc.attrs, rng, False, lex)
        words += ["from", "the", desc.ordinal[1]]
    else:
        if desc.attrs or desc.negations or desc.relations or rng.random() < 0.5:
            words.append("the")
        words += _noun_phrase(desc.shape, desc.attrs, rng, True, lex)
    clauses: list[tuple[str, object]] = [("not", n) for n in desc.negations] + list(desc.relations)
    order = rng.permutation(len(clauses))
    for position, k in enumerate(order):
        kind, value = clauses[k]
        if position > 0:
            words.append("and")
        if kind == "not":
            attr, val = value  # type: ignore[misc]
            words += (["is"] if position > 0 else [_pick(rng, ("that", "which")), "is"]) + ["not"]
            words.append(_pick(rng, lex.attribute_words[attr][val]))
        else:
            if position == 0 and (desc.negations or desc.ordinal is not None or rng.random() < 0.5):
                words += [_pick(rng, ("that", "which")), "is"]
            words += list(_pick(rng, RELATION_WORDS[kind]))
            landmark: Desc = value  # type: ignore[assignment]
            words += ["the", *_noun_phrase(landmark.shape, landmark.attrs, rng, False, lex)]
    return " ".join(words)


def _render_plural(desc: Desc, rng: np.random.Generator, lex: Lexicon) -> str:
    if desc.count == ALL:
        words = ["all", "the"]
    elif desc.count == 2 and rng.random() < 0.5:
        words = ["both"]
    else:
        words = ["the", COUNT_WORDS[desc.count]]  # type: ignore[index]
    values = dict(desc.attrs)
    words += [_pick(rng, lex.attribute_words[a][values[a]]) for a in ATTRIBUTES if a in values]
    words.append(_pick(rng, lex.plurals[desc.shape]))  # type: ignore[index]
    return " ".join(words)


def _noun_phrase(
    shape: str, attrs: Sequence[tuple[str, str]], rng: np.random.Generator, allow_with: bool, lex: Lexicon
) -> list[str]:
    values = dict(attrs)
    pattern = values.get("pattern")
    with_noun = allow_with and pattern in lex.pattern_nouns and rng.random() < 0.4
    color_after = shape in lex.color_after and "color" in values and rng.random() < 0.5
    words = [
        _pick(rng, lex.attribute_words[a][values[a]])
        for a in ATTRIBUTES
        if a in values and not (a == "pattern" and with_noun) and not (a == "color" and color_after)
    ]
    words += _pick(rng, lex.nouns[shape]).split()
    if with_noun:
        words += ["with", _pick(rng, lex.pattern_nouns[pattern])]
    if color_after:
        words += ["in", _pick(rng, lex.attribute_words["color"][values["color"]])]
    return words


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------------------------------ parsing


class _Words:
    """The lookup tables of a lexicon's parser."""

    def __init__(self, lex: Lexicon) -> None:
        self.lex = lex
        # noun wordings as word tuples, longest first, so "teddy bear" is tried before "bear"
        self.nouns = sorted(
            ((tuple(w.split()), n) for n, words in lex.nouns.items() for w in words), key=lambda p: -len(p[0])
        )
        self.adjectives = {
            w: (a, v) for a, table in lex.attribute_words.items() for v, words in table.items() for w in words
        }
        self.pattern_nouns = {w: v for v, words in lex.pattern_nouns.items() for w in words}
        self.prefixes = (
            {w: d for d, words in SUPERLATIVE_PREFIXES.items() for w in words} if lex.superlatives else {}
        )
        self.plurals = sorted(
            ((tuple(w.split()), n) for n, words in (lex.plurals or {}).items() for w in words),
            key=lambda p: -len(p[0]),
        )


COUNTS_OF = {word: k for k, word in COUNT_WORDS.items()}
_RELATION_PHRASES = sorted(
    ((phrase, rel) for rel, phrases in RELATION_WORDS.items() for phrase in phrases), key=lambda p: -len(p[0])
)
_TABLES: dict[int, _Words] = {}


def _tables(lex: Lexicon) -> _Words:
    if id(lex) not in _TABLES:
        _TABLES[id(lex)] = _Words(lex)
    return _TABLES[id(lex)]


def vocabulary(lex: Lexicon = SYNTH_LEXICON) -> set[str]:
    """Every word the grammar can produce (for the synthetic lexicon each is one bert-base-uncased
    wordpiece)."""
    t = _tables(lex)
    words = {"the", "a", "from", "that", "which", "is", "not", "and", "with", *ORDINALS, *DIRECTIONS}
    words |= {w for phrase, _ in t.nouns for w in phrase} | set(t.adjectives) | set(t.pattern_nouns)
    if lex.superlatives:
        words |= set(t.prefixes) | {w for phrase in SUPERLATIVE_SUFFIXES.values() for w in phrase}
    if lex.color_after:
        words.add("in")
    if lex.plurals:
        words |= {w for phrase, _ in t.plurals for w in phrase} | {"both", "all", *COUNT_WORDS.values()}
    return words | {w for phrase, _ in _RELATION_PHRASES for w in phrase}


def parse(text: str, lex: Lexicon = SYNTH_LEXICON) -> Desc:
    """The description a sentence of the grammar denotes; GrammarError for anything else."""
    parser = _Parser(text.lower().split(), _tables(lex))
    desc = parser.expression()
    if parser.pos != len(parser.words):
        raise GrammarError(f"unexpected {parser.words[parser.pos]!r} in {text!r}")
    return desc


class _Parser:
    def __init__(self, words: list[str], tables: _Words) -> None:
        self.words = words
        self.t = tables
        self.pos = 0

    def peek(self, ahead: int = 0) -> str | None:
        at = self.pos + ahead
        return self.words[at] if at < len(self.words) else None

    def take(self, *options: str) -> str | None:
        word = self.peek()
        if word is not None and word in options:
            self.pos += 1
            return word
        return None

    def take_phrase(self, phrase: Sequence[str]) -> bool:
        if tuple(self.words[self.pos : self.pos + len(phrase)]) == tuple(phrase):
            self.pos += len(phrase)
            return True
        return False

    def expect(self, *options: str) -> str:
        word = self.take(*options)
        if word is None:
            raise GrammarError(
                f"expected {' or '.join(options)} at word {self.pos + 1} of {' '.join(self.words)!r}"
            )
        return word

    def expression(self) -> Desc:
        if self.t.plurals and (
            self.peek() in ("both", "all") or (self.peek() == "the" and self.peek(1) in COUNTS_OF)
        ):
            return self.plural()
        self.take("the", "a")
        word = self.take(*ORDINALS)
        ordinal = None
        if word is None and self.t.prefixes and self.peek() in self.t.prefixes and self.peek(1) is not None:
            ordinal = (1, self.t.prefixes[self.expect(*self.t.prefixes)])
        shape, attrs = self.noun_phrase()
        if word is not None:
            self.expect("from")
            self.expect("the")
            ordinal = (ORDINALS.index(word) + 1, self.expect(*DIRECTIONS))
        elif ordinal is None and self.t.prefixes:
            for direction, phrase in SUPERLATIVE_SUFFIXES.items():
                if self.take_phrase(phrase):
                    ordinal = (1, direction)
                    break
        negations: list[tuple[str, str]] = []
        relations: list[tuple[str, Desc]] = []
        first = True
        while self.peek() is not None:
            if not first:
                self.expect("and")
            self.take("that", "which")
            self.take("is")
            if self.take("not"):
                word = self.expect(*self.t.adjectives)
                negations.append(self.t.adjectives[word])
            else:
                relation = self.relation()
                self.expect("the")
                relations.append((relation, Desc(*self.noun_phrase())))
            first = False
        # clauses are a conjunction: keep them in a canonical order, whatever the wording's order
        negations.sort(key=lambda n: (ATTRIBUTES.index(n[0]), n[1]))
        relations.sort(key=lambda r: (RELATIONS.index(r[0]), r[1].shape, r[1].attrs))
        return Desc(shape, attrs, tuple(negations), tuple(relations), ordinal)

    def plural(self) -> Desc:
        """both | all the | the two/three/four, adjectives, a plural noun; nothing after it."""
        if self.take("both"):
            count = 2
        elif self.take("all"):
            self.expect("the")
            count = ALL
        else:
            self.expect("the")
            count = COUNTS_OF[self.expect(*COUNTS_OF)]
        values: dict[str, str] = {}
        while self.peek() in self.t.adjectives and self.phrase_at(self.t.plurals) is None:
            attr, value = self.t.adjectives[self.expect(*self.t.adjectives)]
            if attr in values:
                raise GrammarError(f"two {attr} words")
            values[attr] = value
        found = self.phrase_at(self.t.plurals)
        if found is None:
            raise GrammarError(f"expected a plural noun at word {self.pos + 1} of {' '.join(self.words)!r}")
        self.pos += len(found[0])
        shape = found[1]
        if self.peek() is not None:
            raise GrammarError(f"unexpected {self.peek()!r} after a plural noun in {' '.join(self.words)!r}")
        if shape == ANY_SHAPE and not values:
            raise GrammarError(f"{' '.join(self.words)!r} names no kind of object")
        return Desc(shape, tuple((a, values[a]) for a in ATTRIBUTES if a in values), count=count)

    def phrase_at(
        self, phrases: list[tuple[tuple[str, ...], str]], pos: int | None = None
    ) -> tuple[tuple[str, ...], str] | None:
        """The first (longest) of `phrases` whose words start at `pos` (default: here), with its noun."""
        pos = self.pos if pos is None else pos
        for phrase, noun in phrases:
            if tuple(self.words[pos : pos + len(phrase)]) == phrase:
                return phrase, noun
        return None

    def noun_phrase(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        values: dict[str, str] = {}
        while self.peek() in self.t.adjectives:
            # a word that is an adjective and a noun ("orange") is the noun when no noun phrase follows it
            if self.phrase_at(self.t.nouns) and not (
                self.peek(1) in self.t.adjectives or self.phrase_at(self.t.nouns, self.pos + 1)
            ):
                break
            attr, value = self.t.adjectives[self.expect(*self.t.adjectives)]
            if attr in values:
                raise GrammarError(f"two {attr} words")
            values[attr] = value
        found = self.phrase_at(self.t.nouns)
        if found is None:
            raise GrammarError(f"expected a noun at word {self.pos + 1} of {' '.join(self.words)!r}")
        self.pos += len(found[0])
        shape = found[1]
        if self.take("with"):
            if "pattern" in values:
                raise GrammarError("two pattern words")
            values["pattern"] = self.t.pattern_nouns[self.expect(*self.t.pattern_nouns)]
        if self.t.lex.color_after and self.peek() == "in" and self.peek(1) in self.t.adjectives:
            self.pos += 1
            attr, value = self.t.adjectives[self.expect(*self.t.adjectives)]
            if attr != "color" or attr in values:
                raise GrammarError(f"'in' takes one colour word in {' '.join(self.words)!r}")
            values[attr] = value
        return shape, tuple((a, values[a]) for a in ATTRIBUTES if a in values)

    def relation(self) -> str:
        for phrase, relation in _RELATION_PHRASES:
            if self.take_phrase(phrase):
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


def match_value(obj: Obj, shape: str, attrs: Sequence[tuple[str, str]]) -> float:
    """Does `obj` fit the noun phrase? NO on another noun or a known other value; UNCLEAR if a value asked
    for is UNKNOWN for it."""
    if obj.shape != shape and shape != ANY_SHAPE:
        return NO
    value = YES
    for attr, wanted in attrs:
        own = obj.attribute(attr)
        if own == UNKNOWN:
            value = UNCLEAR
        elif own != wanted:
            return NO
    return value


def matches(obj: Obj, shape: str, attrs: Sequence[tuple[str, str]]) -> bool:
    return match_value(obj, shape, attrs) == YES


def truth(desc: Desc, objs: Sequence[Obj]) -> list[float] | None:
    """Three-valued truth of `desc` without its ordinal, per object; None if a landmark is not unique."""
    values = [match_value(o, desc.shape, desc.attrs) for o in objs]
    for attr, value in desc.negations:
        values = [
            NO if o.attribute(attr) == value else min(v, UNCLEAR) if o.attribute(attr) == UNKNOWN else v
            for v, o in zip(values, objs)
        ]
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
    noun = [match_value(o, desc.shape, desc.attrs) for o in objs]
    if any(v == UNCLEAR for v in values) or any(v == UNCLEAR for v in noun):
        return None
    # the ordinal counts among the objects that pass every clause ...
    filtered = rank([i for i, v in enumerate(values) if v == YES], objs, direction, k)
    # ... or among the objects of the noun phrase, the clauses then describing the one counted; both
    # readings must agree
    counted = rank([i for i, v in enumerate(noun) if v == YES], objs, direction, k)
    return filtered if filtered is not None and filtered == counted else None


def resolve_set(desc: Desc, objs: Sequence[Obj]) -> tuple[int, ...] | None:
    """The objects `desc` clearly names, as a tuple of indices: one object for a singular description, two
    or more (as many as its count says) for a plural one, none for a singular one that fits no object
    (every object clearly not it). None when that is unclear or the description does not fit the scene."""
    values = truth(desc, objs)
    if values is None:
        return None
    if desc.count is None and desc.ordinal is not None:
        found = resolve(desc, objs)
        return None if found is None else (found,)
    if any(v == UNCLEAR for v in values):
        return None
    chosen = tuple(i for i, v in enumerate(values) if v == YES)
    if desc.count is None:
        return chosen if len(chosen) <= 1 else None
    if len(chosen) < 2 or desc.count not in (ALL, len(chosen)):
        return None
    return chosen


def min_level(target: int, objs: Sequence[Obj], lex: Lexicon = SYNTH_LEXICON) -> int:
    """The lowest level at which some description identifies `target` (4 if levels 1-3 cannot)."""
    obj = objs[target]
    if resolve(Desc(obj.shape), objs) == target:
        return 1
    full = full_desc(obj, lex)
    if resolve(full, objs) == target:
        return 2
    if lex.superlatives and any(
        resolve(Desc(obj.shape, attrs, ordinal=(1, d)), objs) == target
        for attrs in ((), full.attrs)
        for d in DIRECTIONS
    ):
        return 2
    for j in unique_landmarks(objs, lex):
        if j == target:
            continue
        for relation in RELATIONS:
            desc = Desc(obj.shape, full.attrs, relations=((relation, full_desc(objs[j], lex)),))
            if resolve(desc, objs) == target:
                return 3
    return 4


def full_desc(obj: Obj, lex: Lexicon = SYNTH_LEXICON) -> Desc:
    """The object's noun with every attribute value the lexicon can say."""
    return Desc(
        obj.shape, tuple((a, obj.attribute(a)) for a in ATTRIBUTES if lex.worded(a, obj.attribute(a)))
    )


def unique_landmarks(objs: Sequence[Obj], lex: Lexicon = SYNTH_LEXICON) -> list[int]:
    """Objects a level-1/2 description can name (no twin with the same noun and attributes)."""
    return [j for j, o in enumerate(objs) if resolve(full_desc(o, lex), objs) == j]
