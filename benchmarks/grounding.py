"""Does the model read the sentence? Pairs of expressions one word apart must segment different objects.

    python benchmarks/grounding.py --checkpoint lite --scenes 40
    python benchmarks/grounding.py --blind     # the same model with its text features zeroed: grounds none

On held-out scenes of the synthetic benchmark (the `val` split of the default model's seed), every sentence of
every referent has each swappable word replaced in turn by each of its counterparts: left/right,
leftmost/rightmost, above/below, top/bottom, one colour for another, small/large, one ordinal for another.
The grammar's interpreter keeps a swapped sentence when it names exactly one object, another one than the
original: "the red star left of the ring" / "the red star right of the ring" name two stars. Both sentences
of a pair are segmented; the pair is *grounded* when each mask has IoU >= 0.5 with its own object (so the
two masks differ). A model blind to the words gives one mask for both sentences, which cannot match two
disjoint objects: it grounds no pair and gets at most half the sentences right. Reported per kind of swap
and overall.
"""

from __future__ import annotations

import argparse
import io
import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lgformer.app.demo import SYNTH_SEED, SYNTH_SIZE
from lgformer.data.masks import decode_segmentation
from lgformer.data.synth.generate import REFS_PER_SCENE, make_scene
from lgformer.data.synth.grammar import COLORS, ORDINALS, GrammarError, parse, resolve
from lgformer.predictor import Segmenter

SWAPS = {
    "left/right": (("left", "right"), ("leftmost", "rightmost")),
    "above/below": (("above", "below", "under", "beneath"), ("top", "bottom")),
    "colour": (COLORS,),
    "size": (("small", "large", "little", "big"),),
    "ordinal": (ORDINALS,),
}


@dataclass(frozen=True)
class Pair:
    kind: str
    first: str  # a sentence of the benchmark
    first_object: int
    second: str  # the same sentence, one word swapped
    second_object: int


def one_word_pairs(sentences: list[str], target: int, objs: list) -> list[Pair]:
    """Every one-word swap of each of `sentences` (which name object `target`) that names another object."""
    pairs = []
    for sentence in sentences:
        words = sentence.split()
        for pos, word in enumerate(words):
            for kind, groups in SWAPS.items():
                for group in groups:
                    if word not in group:
                        continue
                    for other in group:
                        if other == word:
                            continue
                        swapped = " ".join([*words[:pos], other, *words[pos + 1 :]])
                        try:
                            named = resolve(parse(swapped), objs)
                        except GrammarError:
                            continue
                        if named is not None and named != target:
                            pairs.append(Pair(kind, sentence, target, swapped, named))
    return pairs


def held_out_pairs(scenes: int, per_scene: int = 4) -> list[tuple[np.ndarray, list[np.ndarray], Pair]]:
    """Up to `per_scene` pairs (spread over the kinds) from each of the first `scenes` val scenes: the
    picture, every object's visible mask and the pair."""
    rng = np.random.default_rng(0)
    out = []
    for index in range(scenes):
        scene = make_scene(SYNTH_SEED, "val", index, SYNTH_SIZE, REFS_PER_SCENE)
        picture = np.array(Image.open(io.BytesIO(scene.jpeg)).convert("RGB"))
        h, w = picture.shape[:2]
        masks = [decode_segmentation(m, h, w, "exactly_one", "scene") for m in scene.masks]
        pairs = [p for target, texts in scene.refs for p in one_word_pairs(texts, target, scene.objs)]
        by_kind = defaultdict(list)
        for pair in pairs:
            by_kind[pair.kind].append(pair)
        chosen = [group[rng.integers(len(group))] for group in by_kind.values()]
        rest = [p for p in pairs if p not in chosen]
        order = rng.permutation(len(rest)).tolist()
        chosen += [rest[i] for i in order[: max(0, per_scene - len(chosen))]]
        out += [(picture, masks, pair) for pair in chosen[:per_scene]]
    return out


def grounding(seg: Segmenter, pairs: list[tuple[np.ndarray, list[np.ndarray], Pair]]) -> dict[str, dict]:
    """Per kind of swap and overall: pairs, grounded share, and the share of single sentences right."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # pairs, grounded, sentences right
    for picture, masks, pair in pairs:
        first, second = seg.predict(picture, [pair.first, pair.second])
        right = [
            _iou(first.mask, masks[pair.first_object]) >= 0.5,
            _iou(second.mask, masks[pair.second_object]) >= 0.5,
        ]
        for key in (pair.kind, "all"):
            counts[key][0] += 1
            counts[key][1] += int(all(right))
            counts[key][2] += sum(right)
    return {
        kind: {"pairs": n, "grounded": grounded / n, "sentences_right": right / (2 * n)}
        for kind, (n, grounded, right) in sorted(counts.items())
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="lite", help="checkpoint folder or shipped model (default: lite)")
    p.add_argument("--scenes", type=int, default=40, help="held-out val scenes (default 40)")
    p.add_argument("--per-scene", type=int, default=4, help="pairs per scene (default 4)")
    p.add_argument("--blind", action="store_true", help="zero the text features: a model blind to words")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args()
    seg = Segmenter.from_pretrained(args.checkpoint, device="cpu")
    if args.blind:
        seg.model.text_encoder.register_forward_hook(lambda module, inputs, output: output.zero_())
    result = grounding(seg, held_out_pairs(args.scenes, args.per_scene))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'swap':<12} {'pairs':>6} {'grounded':>9} {'sentences':>10}")
    for kind, r in result.items():
        print(f"{kind:<12} {r['pairs']:>6} {r['grounded']:>9.1%} {r['sentences_right']:>10.1%}")


if __name__ == "__main__":
    main()
