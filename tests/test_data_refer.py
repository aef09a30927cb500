"""REFER loading on the real refcoco-mini fixture: masks, sentences, splits, GT rules, items, errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lgformer.data import DataConfig, build_dataset, collate
from lgformer.data.dataset import ReferDataset
from lgformer.data.masks import decode_segmentation
from lgformer.data.sources import export_jsonl, load_jsonl, load_refer, referent_mask
from lgformer.errors import LGFormerError
from lgformer.model.common import IMAGENET_MEAN, IMAGENET_STD

# (refcoco ref, refcoco+ ref, image id, exact mask pixels) from the fixture's README
REFERENTS = [(10553, 10520, 460370, 39418), (36437, 36329, 157714, 100564), (18836, 18772, 363252, 12760)]


@pytest.fixture(scope="module")
def mini(shared_data: Path) -> Path:
    return shared_data / "refcoco-mini"


def exact_mask(mini: Path, refcoco_id: int) -> np.ndarray:
    (path,) = (mini / "exact_masks").glob(f"ref{refcoco_id}_refcoco+*.png")
    return np.array(Image.open(path)) > 0


@pytest.mark.parametrize("dataset", ["refcoco", "refcoco+"])
def test_three_referents_load_with_sentences_and_splits(mini: Path, dataset: str) -> None:
    referents = load_refer(mini, dataset, "unc")
    column = 0 if dataset == "refcoco" else 1
    assert sorted(r.ref_id for r in referents) == sorted(row[column] for row in REFERENTS)
    assert {r.split for r in referents} == {"val"}
    for ref in referents:
        row = next(row for row in REFERENTS if row[column] == ref.ref_id)
        assert ref.image_id == row[2]
        assert ref.image.is_file() and ref.image.name == f"COCO_train2014_{row[2]:012d}.jpg"
        assert len(ref.sentences) == 3 and all(s.text.strip() for s in ref.sentences)
    by_id = {r.ref_id: [s.text for s in r.sentences] for r in referents}
    if dataset == "refcoco":
        assert "man texting" in by_id[10553]
    else:
        assert by_id[10520][0] == "man closest to us"


def test_rle_masks_are_identical_to_the_exact_masks(mini: Path) -> None:
    for ref in load_refer(mini, "refcoco+", "unc"):
        row = next(row for row in REFERENTS if row[1] == ref.ref_id)
        mask = referent_mask(ref, "exactly_one")
        exact = exact_mask(mini, row[0])
        assert mask.dtype == bool and mask.shape == exact.shape
        assert np.array_equal(mask, exact) and mask.sum() == row[3]


@pytest.mark.parametrize("rule", ["exactly_one", "union"])
def test_polygon_masks_match_the_exact_masks(mini: Path, rule: str) -> None:
    for ref in load_refer(mini, "refcoco", "unc"):
        mask = referent_mask(ref, rule)
        exact = exact_mask(mini, ref.ref_id)
        assert mask.shape == exact.shape
        assert (mask & exact).sum() / (mask | exact).sum() >= 0.97


def test_exactly_one_rule_drops_pixels_covered_by_two_polygons(mini: Path, writable_copy) -> None:
    root = writable_copy(mini)
    path = root / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    ann = instances["annotations"][0]
    ann["segmentation"] = [[10, 10, 50, 10, 50, 50, 10, 50], [30, 30, 70, 30, 70, 70, 30, 70]]
    path.write_text(json.dumps(instances))
    ref = next(r for r in load_refer(root, "refcoco", "unc") if r.object_id == ann["id"])
    union, exactly_one = referent_mask(ref, "union"), referent_mask(ref, "exactly_one")
    overlap = union & ~exactly_one
    assert overlap.sum() == 20 * 20 and overlap[30:50, 30:50].all()
    assert exactly_one.sum() == union.sum() - 400


def test_uncompressed_rle_decodes_like_compressed(mini: Path, writable_copy) -> None:
    root = writable_copy(mini)
    path = root / "refcoco+" / "instances.json"
    instances = json.loads(path.read_text())
    seg = instances["annotations"][0]["segmentation"]
    dense = decode_segmentation(seg, *seg["size"], "exactly_one", "test")
    flat = dense.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist() if flat[0] == 0 else [0, *np.diff(bounds).tolist()]
    instances["annotations"][0]["segmentation"] = {"size": seg["size"], "counts": counts}
    path.write_text(json.dumps(instances))
    ann_id = instances["annotations"][0]["id"]
    ref = next(r for r in load_refer(root, "refcoco+", "unc") if r.object_id == ann_id)
    assert np.array_equal(referent_mask(ref, "exactly_one"), dense)


def test_evaluation_items_follow_the_authors_transform(mini: Path) -> None:
    dataset = build_dataset(DataConfig(root=str(mini), dataset="refcoco+", image_size=96), "val", train=False)
    assert len(dataset) == 9  # every sentence of the three refs
    item = dataset[0]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (96, 96) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["words"] == len(item["sentence"].split()) and item["level"] == 0
    ref = dataset.referent(0)
    image = Image.open(ref.image).convert("RGB").resize((96, 96), Image.BILINEAR)
    expected = (
        torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255.0
        - torch.tensor(IMAGENET_MEAN)[:, None, None]
    )
    expected = expected / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(item["image"], expected, atol=1e-6)
    gt = Image.fromarray(dataset.original_mask(0).astype(np.uint8)).resize((96, 96), Image.NEAREST)
    assert torch.equal(item["mask"], torch.from_numpy(np.array(gt)).float())
    assert dataset.image_path(0) == ref.image
    assert sorted({dataset.sentence(i).sent_id for i in range(9)}) == sorted(
        s.sent_id for r in dataset.referents for s in r.sentences
    )


def test_training_draws_one_reproducible_sentence_per_ref(mini: Path) -> None:
    referents = load_refer(mini, "refcoco", "unc")
    dataset = ReferDataset(referents, train=True, image_size=64, seed=3)
    assert len(dataset) == 3

    def draws(ds: ReferDataset, epoch: int) -> list:
        ds.set_epoch(epoch)
        return [ds.sentence(i).sent_id for i in range(len(ds))]

    again = ReferDataset(referents, train=True, image_size=64, seed=3)
    epochs = [draws(dataset, e) for e in range(8)]
    assert epochs == [draws(again, e) for e in range(8)]  # a resumed run sees the same sentences
    assert len({tuple(e) for e in epochs}) > 1  # and they change from epoch to epoch
    every = ReferDataset(referents, train=True, image_size=64, all_sentences=True)
    assert len(every) == 9


def test_collate_stacks_tensors_and_keeps_ids(mini: Path) -> None:
    from lgformer.text.tokenizer import Tokenizer

    tokenizer = Tokenizer(max_tokens=20)
    dataset = build_dataset(
        DataConfig(root=str(mini), image_size=32), "val", train=False, tokenizer=tokenizer
    )
    batch = collate([dataset[0], dataset[4]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert batch["ids"].shape == (2, 20) and batch["text_mask"].dtype == torch.long
    assert batch["ids"][0, 0] == 101  # [CLS]
    assert isinstance(batch["sentence"], list) and isinstance(batch["sent_id"], list)
    assert batch["index"].tolist() == [0, 4]


def test_image_dir_override(mini: Path, writable_copy) -> None:
    root = writable_copy(mini)
    moved = root / "images" / "train2014"
    shutil.move(root / "images" / "mscoco" / "images" / "train2014", moved)
    cfg = DataConfig(root=str(root), image_size=32, image_dir=str(moved))
    assert build_dataset(cfg, "val", train=False)[0]["image"].shape == (3, 32, 32)


def test_split_names_match_exactly(mini: Path) -> None:
    with pytest.raises(LGFormerError, match=r"no referents in split 'va'; splits present: val"):
        build_dataset(DataConfig(root=str(mini)), "va", train=False)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_instances_json_names_the_file(mini: Path, writable_copy) -> None:
    root = writable_copy(mini)
    (root / "refcoco" / "instances.json").unlink()
    with pytest.raises(LGFormerError) as exc:
        build_dataset(DataConfig(root=str(root)), "val", train=False)
    assert str(root / "refcoco" / "instances.json") in one_line(exc)


def test_missing_refs_file_lists_what_exists(mini: Path) -> None:
    with pytest.raises(LGFormerError, match=r"refs\(google\)\.p: file not found .*refs\(unc\)\.p"):
        load_refer(mini, "refcoco", "google")


def test_missing_image_names_the_file(mini: Path, writable_copy) -> None:
    root = writable_copy(mini)
    dataset = build_dataset(DataConfig(root=str(root), image_size=32), "val", train=False)
    dataset.image_path(0).unlink()
    with pytest.raises(LGFormerError) as exc:
        dataset[0]
    assert f"image not found: {dataset.image_path(0)}" == one_line(exc)


def test_corrupt_jpeg_names_the_file(mini: Path, writable_copy) -> None:
    root = writable_copy(mini)
    dataset = build_dataset(DataConfig(root=str(root), image_size=32), "val", train=False)
    path = dataset.image_path(0)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(LGFormerError) as exc:
        dataset[0]
    assert one_line(exc).startswith(f"{path}: cannot decode image")


def test_empty_sentence_in_refs_names_the_file_and_ref(mini: Path, writable_copy) -> None:
    root = writable_copy(mini)
    path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    refs[1]["sentences"][2]["raw"] = "  "
    path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(LGFormerError) as exc:
        load_refer(root, "refcoco", "unc")
    assert one_line(exc) == f"{path} ref_id {refs[1]['ref_id']}: sentence {refs[1]['sent_ids'][2]} is empty"


@pytest.mark.parametrize("rule", ["exactly_one", "union"])
def test_jsonl_export_round_trips(mini: Path, tmp_path: Path, rule: str) -> None:
    for dataset in ("refcoco", "refcoco+"):
        referents = load_refer(mini, dataset, "unc")
        out = tmp_path / dataset / "export.jsonl"
        assert export_jsonl(referents, out) == 3
        back = load_jsonl(out)
        for a, b in zip(referents, back):
            assert b.ref_id == str(a.ref_id) and b.split == a.split and b.image.resolve() == a.image.resolve()
            assert [s.text for s in b.sentences] == [s.text for s in a.sentences]
            assert np.array_equal(referent_mask(a, rule), referent_mask(b, rule))


def test_unknown_dataset_and_rule_list_the_valid_ones(mini: Path) -> None:
    with pytest.raises(
        LGFormerError, match="unknown dataset 'refcoco-'; valid datasets: refcoco, refcoco\\+"
    ):
        build_dataset(DataConfig(root=str(mini), dataset="refcoco-"), "val", train=False)
    with pytest.raises(LGFormerError, match="unknown gt_rule 'sum'; valid rules: exactly_one, union"):
        build_dataset(DataConfig(root=str(mini), gt_rule="sum"), "val", train=False)
