"""Generalized referring data (issue 23): gRefCOCO in its users' layout, and JSONL lines naming several
objects or nothing. The fixture is the three real refcoco-mini photos (tests/conftest.py)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from lgformer.cli import main
from lgformer.config import DataConfig
from lgformer.data.dataset import build_dataset, collate
from lgformer.data.masks import decode_segmentation
from lgformer.data.sources import TargetUnion, export_jsonl, load_grefcoco, load_jsonl, referent_mask
from lgformer.errors import LGFormerError


def test_grefcoco_loads_with_single_multi_and_no_target_refs(grefcoco_root: Path) -> None:
    refs = load_grefcoco(grefcoco_root, "unc")
    assert len(refs) == 9
    assert sorted({r.split for r in refs}) == ["testA", "train", "val"]
    assert [r.targets for r in refs] == [1, 2, 0] * 3
    instances = json.loads((grefcoco_root / "grefcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    for ref in refs:
        mask = referent_mask(ref, "exactly_one")
        assert mask.shape == ref.size and ref.image.is_file()
        if ref.targets == 0:
            assert ref.no_target and not mask.any()
        elif ref.targets == 2:
            assert isinstance(ref.segmentation, TargetUnion)
            parts = [
                decode_segmentation(anns[a]["segmentation"], *ref.size, "exactly_one", "t")
                for a in ref.object_id
            ]
            assert np.array_equal(mask, parts[0] | parts[1])
            assert mask.sum() > max(p.sum() for p in parts)  # the second object adds pixels
        else:
            assert mask.sum() > 1000


def test_grefcoco_items_and_stats(grefcoco_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DataConfig(root=str(grefcoco_root), dataset="grefcoco", image_size=64)
    data = build_dataset(cfg, "train", train=False)
    batch = collate([data[k] for k in range(len(data))])
    assert batch["targets"].tolist() == [1, 1, 1, 2, 0]  # three sentences of the single ref, then one each
    assert batch["mask"][-1].sum() == 0 and batch["mask"][3].sum() > batch["mask"][0].sum()
    assert main(["data", "stats", "--root", str(grefcoco_root), "--dataset", "grefcoco", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kinds"] == {"single": 9, "multi": 3, "no-target": 3}
    assert report["objects"] == 6 and report["refs"] == 9 and report["images"] == 3
    assert main(["data", "stats", "--root", str(grefcoco_root), "--dataset", "grefcoco"]) == 0
    assert "nothing: 3 (20.0%)" in capsys.readouterr().out


def test_grefcoco_pickle_is_read_with_the_restricted_unpickler(grefcoco_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "p"
    shutil.copytree(grefcoco_root, root)
    refs_json = root / "grefcoco" / "grefs(unc).json"
    refs = json.loads(refs_json.read_text())
    refs_json.unlink()
    (root / "grefcoco" / "grefs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    assert [r.targets for r in load_grefcoco(root, "unc")] == [1, 2, 0] * 3
    (root / "grefcoco" / "grefs(unc).p").write_bytes(pickle.dumps([Path("x")], protocol=2))
    with pytest.raises(LGFormerError, match="refused pickle global"):
        load_grefcoco(root, "unc")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("sentences"), "ref_id 105531: missing field(s) sentences"),
        (lambda r: r.update(ann_id="900000"), "ref_id 105531: field 'ann_id': expected an annotation id or"),
        (lambda r: r.update(ann_id=[]), "ref_id 105531: field 'ann_id': expected an annotation id or a non-"),
        (
            lambda r: r.update(ann_id=[900000, -1]),
            "ref_id 105531: field 'ann_id': -1 (no target) stands alone",
        ),
        (lambda r: r.update(ann_id=[900000, 5]), "ref_id 105531: field 'ann_id': annotation 5 is not in"),
        (lambda r: r.update(no_target=True), "ref_id 105531: field 'no_target': True but 'ann_id'"),
    ],
    ids=[
        "no-sentences",
        "ann-id-int",
        "ann-id-empty",
        "minus-one-mixed",
        "unknown-ann",
        "no-target-contradicts",
    ],
)
def test_malformed_grefs_are_one_line_errors(
    grefcoco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change, message: str
) -> None:
    root = tmp_path / "bad"
    shutil.copytree(grefcoco_root, root)
    path = root / "grefcoco" / "grefs(unc).json"
    refs = json.loads(path.read_text())
    change(refs[1])
    path.write_text(json.dumps(refs))
    assert main(["data", "stats", "--root", str(root), "--dataset", "grefcoco"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err
    assert message in err, err


def test_jsonl_names_several_objects_or_nothing(tmp_path: Path, grefcoco_root: Path) -> None:
    """A list of masks is their union; `"mask": null` or `"no_target": true` names nothing; export keeps
    both."""
    refs = load_grefcoco(grefcoco_root, "unc")
    out = tmp_path / "g.jsonl"
    assert export_jsonl(refs, out) == 9
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[1]["mask"][0] == {"polygons": refs[1].segmentation.parts[0]} and len(lines[1]["mask"]) == 2
    assert lines[2]["mask"] is None and lines[2]["no_target"] is True
    back = load_jsonl(out)
    assert [r.targets for r in back] == [1, 2, 0] * 3
    for a, b in zip(refs, back):
        assert np.array_equal(referent_mask(a, "exactly_one"), referent_mask(b, "exactly_one"))
    # the other spellings of "nothing", and their contradictions
    image = refs[0].image
    base = {"image": str(image), "sentences": ["the giraffe"], "split": "val"}
    variants = [
        {**base, "id": "a", "no_target": True},
        {**base, "id": "b", "mask": None},
        {**base, "id": "c", "mask": None, "no_target": True},
    ]
    out.write_text("".join(json.dumps(v) + "\n" for v in variants))
    assert [r.targets for r in load_jsonl(out)] == [0, 0, 0]
    for bad, message in (
        (
            {**base, "id": "d", "mask": None, "no_target": False},
            "field 'mask': null .no target. but 'no_target'",
        ),
        ({**base, "id": "e", "mask": [], "no_target": False}, "field 'mask': an empty list"),
        (
            {**base, "id": "f", "mask": {"polygons": [[0, 0, 5, 0, 5, 5]]}, "no_target": True},
            "no-target line",
        ),
        ({**base, "id": "g", "no_target": "yes"}, "field 'no_target': expected true or false"),
        ({**base, "id": "h"}, "missing field 'mask'"),
    ):
        out.write_text(json.dumps(bad) + "\n")
        with pytest.raises(LGFormerError, match=f"{out}:1: .*{message}"):
            load_jsonl(out)


def test_eval_scores_gres_data_by_the_gres_protocol(
    grefcoco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Masks of another system on the fixture's val photo (3 sentences naming the big teddy bear, "both
    teddy bears", "the cat on the rug"): the single sentences exact, the plural one given only the big bear,
    the no-target one an all-zero PNG (right: "nothing") — then the same with a mask for it (wrong)."""
    from lgformer.render import mask_image, save_png

    refs = {r.targets: r for r in load_grefcoco(grefcoco_root, "unc") if r.split == "val"}
    single, union = referent_mask(refs[1], "exactly_one"), referent_mask(refs[2], "exactly_one")
    preds = tmp_path / "pred"
    preds.mkdir()
    for ref, mask in ((refs[1], single), (refs[2], single), (refs[0], np.zeros_like(single))):
        for sentence in ref.sentences:
            save_png(preds / f"{sentence.sent_id}.png", mask_image(mask))
    argv = ["eval", "--predictions", str(preds), "--root", str(grefcoco_root), "--dataset", "grefcoco"]
    argv += ["--protocol", "original", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    partial = single.sum() / union.sum()
    assert r["gIoU"] == pytest.approx(100 * (3 + partial + 1) / 5)
    assert r["cIoU"] == pytest.approx(100 * (4 * single.sum()) / (3 * single.sum() + union.sum()))
    assert (r["N-acc"], r["T-acc"], r["no_target"], r["target"]) == (100.0, 100.0, 1, 4)
    assert r["by_kind"]["multi"]["gIoU"] == pytest.approx(100 * partial)
    assert r["by_kind"]["no-target"]["gIoU"] == 100.0 and r["by_kind"]["single"]["gIoU"] == 100.0
    # the classic fields beside them: the same cumulative ratio, but mIoU counts the right "nothing" as 0
    assert r["oIoU"] == pytest.approx(r["cIoU"]) and r["mIoU"] == pytest.approx(100 * (3 + partial) / 5)
    # a mask where nothing is named: N-acc 0, its area joins the cumulative union
    save_png(preds / f"{refs[0].sentences[0].sent_id}.png", mask_image(single))
    assert main(argv) == 0
    wrong = json.loads(capsys.readouterr().out)
    assert (wrong["N-acc"], wrong["T-acc"]) == (0.0, 100.0)
    assert wrong["gIoU"] == pytest.approx(100 * (3 + partial) / 5)
    assert wrong["cIoU"] == pytest.approx(100 * (4 * single.sum()) / (4 * single.sum() + union.sum()))
    assert main([*argv[:-1], "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert "GRES protocol" in text and "| no-target | 1 | 0.00 | 0.00 | 0.00 |" in text
