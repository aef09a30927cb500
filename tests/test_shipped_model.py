"""The shipped default model (`lite`: the synthetic model fine-tuned on real photos) does its job: it segments
real photos far better than a mask of the whole image and held-out synthetic scenes by shape, attributes and
relations, and its bf16 masks are its fp32 masks (issue 6), on the real refcoco-mini photos and on held-out
synthetic scenes, as `benchmarks/bf16_agreement.py` measures them."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from conftest import load_benchmark

from lgformer.data.sources import referent_mask
from lgformer.engine.metrics import two_sided_iou
from lgformer.predictor import Segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fp32() -> Segmenter:
    return Segmenter.from_pretrained("lite", device="cpu")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list:
    """32 objects of the synthetic val split of the model's seed: scenes it was not trained on."""
    return load_benchmark("bf16_agreement").synth_referents(tmp_path_factory.mktemp("synth"), 32)


def test_default_model_segments_held_out_shapes_and_attributes(fp32, held_out):
    inter, union = defaultdict(int), defaultdict(int)
    for ref in held_out:
        truth = referent_mask(ref, "exactly_one")
        for pred in fp32.predict(ref.image, [s.text for s in ref.sentences]):
            inter[ref.level] += int((pred.mask & truth).sum())
            union[ref.level] += int((pred.mask | truth).sum())
    scores = {level: inter[level] / union[level] for level in sorted(inter)}
    # measured 0.920 / 0.855 / 0.766 / 0.228 (19 / 27 / 24 / 18 sentences; 0.949 / 0.950 / 0.931 / 0.222
    # before the no-target head, which says "nothing" to some of them). Level 4 (ordinals, negation, two
    # relations) fell from 0.580 when the model was fine-tuned on real photos (41.0 oIoU on the whole test
    # split against the synthetic-only model's 50.1): its floor only checks it is still read at all
    floors = {1: 0.88, 2: 0.82, 3: 0.72, 4: 0.15}
    assert scores.keys() == floors.keys()
    assert all(scores[level] >= floor for level, floor in floors.items()), scores


def test_default_model_segments_real_photos_far_above_the_whole_image(fp32, tmp_path):
    """The 200 real RefCOCO / RefCOCO+ / RefCOCOg sentences on the 27 coco-subset `eval` photos (never
    trained on), original protocol, by the project's metric code (`benchmarks/real_photos.py`): the model
    against a mask of the whole image, scored the same way."""
    from lgformer.engine.evaluate import evaluate_model, evaluate_predictions, report

    script = load_benchmark("real_photos")
    plain = script.dataset(script.SHARED)
    whole = script.write_baselines(script.SHARED, plain, tmp_path)["whole image"]
    baseline = report(evaluate_predictions(whole, plain, protocol="original"), plain, "original")
    data = script.dataset(script.SHARED, fp32.tokenizer, fp32.image_size)
    model = report(evaluate_model(fp32.model, data, fp32.device, protocol="original"), data, "original")
    assert baseline["sentences"] == model["sentences"] == 200
    assert baseline["oIoU"] == pytest.approx(11.8, abs=0.05)
    # measured: oIoU 22.9, P@0.5 18.5 (the whole image: 11.8 and 0.0; the synthetic-only model: 0.8 and 0.0)
    assert model["oIoU"] >= 17.0 and model["P@0.5"] >= 10.0, model


def test_default_model_reads_the_word_that_changes_the_object(fp32):
    """Sentences one word apart (left/right, above/below, a colour, a size, an ordinal) that name two objects
    of a held-out scene get two masks, each on its own object (`benchmarks/grounding.py`). A model blind to
    the words grounds no pair."""
    script = load_benchmark("grounding")
    result = script.grounding(fp32, script.held_out_pairs(24))
    # measured over 24 scenes: 38% of 47 pairs (colour 60%, left/right 67%, above/below 22%); 51% (colour 90%)
    # before the no-target head, which says "nothing matches" to one side of some pairs; the synthetic-only
    # model grounded 62% (colour 100%)
    assert result["all"]["pairs"] >= 40 and result["all"]["grounded"] >= 0.3, result
    assert result["colour"]["grounded"] >= 0.5, result


def test_bf16_masks_agree_with_fp32_masks(fp32, held_out):
    script = load_benchmark("bf16_agreement")
    bf16 = Segmenter.from_pretrained("lite", device="cpu", dtype="bfloat16")
    for name, refs in (("refcoco-mini", script.mini_referents()), ("synthetic val", held_out)):
        result = script.agreement(fp32, bf16, refs)
        assert min(result["IoU"], result["background_IoU"]) >= 0.98, (name, result)
        assert result["max_probability_difference"] > 0, (name, result)  # bf16 did run


@pytest.mark.parametrize(
    # measured, smallest over the 9 sentences: 1.0 / 0.966 / 0.821 (small masks on photos move most)
    ("dtype", "iou"),
    [(torch.float64, 0.999), (torch.float16, 0.95), (torch.bfloat16, 0.75)],
)
def test_converted_model_runs_in_its_dtype(fp32, dtype, iou):
    """`model.to(dtype)` (`.double()`, `.half()`, `.bfloat16()`) runs end to end in that dtype, pixel decoder
    included; on the refcoco-mini photos its masks match the fp32 ones as far as the dtype allows. A model
    made bf16 throughout (norms, softmax and residuals too) is coarser than bf16 autocast (>= 0.98 above)."""
    model = copy.deepcopy(fp32.model).to(dtype)
    converted = Segmenter(model, fp32.cfg, fp32.device)
    ids = torch.tensor([[101, 1996, 2158, 102]])
    assert model(torch.rand(1, 3, 64, 64), torch.ones_like(ids), ids=ids).dtype == dtype
    for ref in load_benchmark("bf16_agreement").mini_referents():
        sentences = [s.text for s in ref.sentences]
        for a, b in zip(fp32.predict(ref.image, sentences), converted.predict(ref.image, sentences)):
            assert two_sided_iou(a.mask, b.mask) >= iou, (ref.image, a.sentence)  # two empty masks agree


def test_the_shipped_files_hold_no_machine_path():
    """The shipped config records how the model was made, never where: no absolute path in any value."""
    import json

    from lgformer.shipped import DEFAULT_MODEL, SHIPPED

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    config = json.loads((SHIPPED[DEFAULT_MODEL] / "config.json").read_text())
    absolute = [s for s in strings(config) if s.startswith("/") or ":/" in s.split(" ")[0]]
    assert not absolute, absolute
