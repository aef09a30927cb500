"""The words of real photos: category nouns with a few synonyms, and the colour and size attributes that the
pixels and the geometry settle.

Only what an instance annotation supports is ever said: its category, a colour when one named colour clearly
dominates its pixels, its size against the other objects of its category, its position (superlatives and
ordinals, from the geometry) and relations to other objects. Never gender, clothing or actions.
"""

from __future__ import annotations

import re

import numpy as np

from lgformer.data.synth.grammar import UNKNOWN, Lexicon

# COCO's category names -> wordings; a synonym is never shared by two categories ("bike" is the bicycle's).
COCO_NOUNS: dict[str, tuple[str, ...]] = {
    "person": ("person",),
    "bicycle": ("bicycle", "bike"),
    "car": ("car",),
    "motorcycle": ("motorcycle", "motorbike"),
    "airplane": ("airplane", "plane", "jet"),
    "bus": ("bus",),
    "train": ("train",),
    "truck": ("truck",),
    "boat": ("boat",),
    "traffic light": ("traffic light",),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench",),
    "bird": ("bird",),
    "cat": ("cat",),
    "dog": ("dog",),
    "horse": ("horse",),
    "sheep": ("sheep",),
    "cow": ("cow",),
    "elephant": ("elephant",),
    "bear": ("bear",),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack",),
    "umbrella": ("umbrella",),
    "handbag": ("handbag", "purse", "bag"),
    "tie": ("tie",),
    "suitcase": ("suitcase", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("skis",),
    "snowboard": ("snowboard",),
    "sports ball": ("ball",),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "surf board"),
    "tennis racket": ("tennis racket", "racket"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "glass"),
    "cup": ("cup", "mug"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich",),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog",),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake",),
    "chair": ("chair",),
    "couch": ("couch", "sofa"),
    "potted plant": ("potted plant", "plant"),
    "bed": ("bed",),
    "dining table": ("table", "dining table"),
    "toilet": ("toilet",),
    "tv": ("tv", "television"),
    "laptop": ("laptop", "computer"),
    "mouse": ("mouse",),
    "remote": ("remote", "remote control"),
    "keyboard": ("keyboard",),
    "cell phone": ("phone", "cell phone", "cellphone"),
    "microwave": ("microwave",),
    "oven": ("oven",),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy"),
    "hair drier": ("hair dryer", "hair drier"),
    "toothbrush": ("toothbrush",),
}
# Plural wordings where adding -s / -es to the last word is wrong, and nouns said in the singular only
# ("skis" is already plural; "all the broccoli" is a mass); a plural is never shared by two categories.
IRREGULAR_PLURALS = {
    "person": "people",
    "sheep": "sheep",
    "knife": "knives",
    "mouse": "mice",
    "teddy": "teddies",
}
NO_PLURAL = frozenset({"skis", "scissors", "broccoli", "luggage"})
COLOR_WORDS = {
    "white": ("white",),
    "black": ("black",),
    "gray": ("gray", "grey"),
    "red": ("red",),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "blue": ("blue",),
    "purple": ("purple",),
    "pink": ("pink",),
    "brown": ("brown",),
}
# colours a photo's pixels or a reader may take for each other: an absent description never calls a white
# object gray ("the gray dog" beside the one white dog is not clearly about nothing)
NEIGHBOUR_COLORS = (
    ("white", "gray"), ("white", "pink"), ("gray", "black"), ("gray", "blue"), ("gray", "brown"),
    ("black", "brown"), ("black", "blue"), ("red", "orange"), ("red", "pink"), ("red", "brown"),
    ("red", "purple"), ("orange", "yellow"), ("orange", "brown"), ("yellow", "green"), ("green", "blue"),
    ("blue", "purple"), ("purple", "pink"),
)  # fmt: skip
SIZE_WORDS = {"small": ("small", "little", "smaller"), "large": ("big", "large", "bigger")}
MIDDLE = "medium"  # a size that is clearly neither the big nor the small one: never said
# a size is relative ("the small oven" is the smaller of two big ones): no size makes an absence
CONFUSABLE = {
    color: frozenset(b if a == color else a for a, b in NEIGHBOUR_COLORS if color in (a, b))
    for color in COLOR_WORDS
} | {size: frozenset(SIZE_WORDS) for size in (*SIZE_WORDS, MIDDLE)}
WORD_RANGES = {1: (1, 4), 2: (2, 8), 3: (4, 14), 4: (6, 16)}  # multi-word nouns; 16 words fit 20 tokens
WEARERS = frozenset({"person"})  # "the person in red"

# sRGB prototypes of each colour name (several where one name spans light and dark shades)
COLOR_PROTOTYPES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("white", (245, 245, 245)),
    ("white", (225, 225, 215)),
    ("black", (15, 15, 15)),
    ("black", (40, 40, 45)),
    ("gray", (128, 128, 128)),
    ("gray", (180, 180, 180)),
    ("gray", (85, 85, 90)),
    ("red", (200, 30, 35)),
    ("red", (140, 20, 25)),
    ("orange", (240, 140, 30)),
    ("yellow", (240, 220, 50)),
    ("green", (50, 150, 50)),
    ("green", (30, 85, 35)),
    ("green", (140, 190, 80)),
    ("blue", (40, 80, 200)),
    ("blue", (110, 160, 220)),
    ("blue", (25, 35, 90)),
    ("purple", (120, 50, 150)),
    ("pink", (240, 150, 180)),
    ("brown", (120, 75, 40)),
    ("brown", (80, 50, 30)),
)
DOMINANT_SHARE = 0.5  # a colour is named when it covers this share of the object's pixels ...
DOMINANT_LEAD = 2.0  # ... and this many times the share of the runner-up
SIZE_RATIO = 2.0  # "big": at least this many times the area of every other object of its category


def lexicon(categories: list[str]) -> Lexicon:
    """The lexicon of a set of category names: COCO's own wordings, any other name as it is written
    ("traffic_cone (big)" -> "traffic cone")."""
    nouns = {name: COCO_NOUNS.get(name) or (plain_noun(name),) for name in categories}
    return Lexicon(
        nouns=nouns,
        attribute_words={"size": SIZE_WORDS, "color": COLOR_WORDS, "pattern": {}},
        pattern_nouns={},
        word_ranges=WORD_RANGES,
        superlatives=True,
        color_after=WEARERS & set(categories),
        negate_absent=False,
        confusable=CONFUSABLE,
        plurals={
            name: plural
            for name, words in nouns.items()
            if (plural := tuple(plural_noun(w) for w in words if w.split()[-1] not in NO_PLURAL))
        },
    )


def plural_noun(noun: str) -> str:
    """ "traffic light" -> "traffic lights", "bus" -> "buses", "person" -> "people"."""
    *head, last = noun.split()
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "sh", "ch", "x")):
        last += "es"
    else:
        last += "s"
    return " ".join([*head, last])


def plain_noun(name: str) -> str:
    words = re.sub(r"\(.*?\)", " ", name.lower()).replace("_", " ").replace("-", " ").split()
    return " ".join(w for w in words if w.isalpha()) or "object"


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 sRGB -> (N, 3) CIELAB (D65)."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [
            [0.4124564, 0.2126729, 0.0193339],
            [0.3575761, 0.7151522, 0.1191920],
            [0.1804375, 0.0721750, 0.9503041],
        ]
    )
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


_PROTO_NAMES = [name for name, _ in COLOR_PROTOTYPES]
_PROTO_LAB = _srgb_to_lab(np.array([rgb for _, rgb in COLOR_PROTOTYPES], dtype=np.uint8))


def color_name(pixels: np.ndarray) -> str:
    """The colour name of an object from its pixels ((N, 3) uint8): each pixel takes its nearest prototype
    in CIELAB; the name is given only when one colour clearly dominates, else UNKNOWN."""
    if len(pixels) == 0:
        return UNKNOWN
    if len(pixels) > 4096:  # an even subsample: the shares do not need every pixel
        pixels = pixels[:: len(pixels) // 4096]
    lab = _srgb_to_lab(pixels)
    nearest = ((lab[:, None, :] - _PROTO_LAB[None]) ** 2).sum(-1).argmin(1)
    names = sorted(set(_PROTO_NAMES))
    index = {n: k for k, n in enumerate(names)}
    counts = np.bincount([index[_PROTO_NAMES[p]] for p in nearest], minlength=len(names)) / len(nearest)
    order = np.argsort(-counts)
    top, second = counts[order[0]], counts[order[1]]
    if top >= DOMINANT_SHARE and top >= DOMINANT_LEAD * second:
        return names[order[0]]
    return UNKNOWN


def size_names(categories: list[str], areas: list[float]) -> list[str]:
    """Each object's size against the others of its category: large (>= SIZE_RATIO x every other), small
    (<= 1 / SIZE_RATIO x every other), MIDDLE (clearly neither), UNKNOWN (alone, or too close to call)."""
    names = []
    for i, (cat, area) in enumerate(zip(categories, areas)):
        others = [a for j, (c, a) in enumerate(zip(categories, areas)) if c == cat and j != i]
        if not others:
            names.append(UNKNOWN)
        elif area >= SIZE_RATIO * max(others):
            names.append("large")
        elif area * SIZE_RATIO <= min(others):
            names.append("small")
        elif area * SIZE_RATIO <= max(others) and area >= SIZE_RATIO * min(others):
            names.append(MIDDLE)
        else:
            names.append(UNKNOWN)
    return names
