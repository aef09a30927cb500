# ruff: noqa: E501
"""Bad and awkward inputs to every command, through the real CLI in a subprocess: each bad one exits non-zero
with one line on stderr naming the file or field, never a traceback, and leaves nothing half-written; each
awkward-but-valid one succeeds. One row of CASES per input: adding a case is a line."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MINI, PHOTOS, SHARED, bomb_png_header
from PIL import Image

from lgformer.shipped import DEFAULT_MODEL, SHIPPED

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PHOTO = PHOTOS / "COCO_train2014_000000157714.jpg"
COCO = SHARED / "data" / "coco-subset"
GOLDEN = SHARED / "reference" / "official" / "golden_tiny_w7_224.safetensors"
TRAINING_GOLDEN = SHARED / "reference" / "official-training" / "golden_train_tiny_w7_224.safetensors"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _nested(depth: int) -> bytes:
    """A protocol-2 pickle of a list nested `depth` deep, written opcode by opcode (pickle itself would
    recurse): MARK ... LIST, repeated."""
    return b"\x80\x02" + b"(" * depth + b"l" * depth + b"."


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every bad or awkward file the cases name, in one folder."""
    d = tmp_path_factory.mktemp("bad")
    (d / "afile").write_text("not a folder\n")
    (d / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (d / "bomb.png").write_bytes(bomb_png_header())
    Image.open(PHOTO).convert("L").save(d / "gray.png")
    Image.open(PHOTO).convert("RGBA").save(d / "rgba.png")
    Image.new("RGB", (8, 8)).save(d / "tiny.png")
    (d / "no-config").mkdir()
    corrupt = d / "corrupt-ckpt"
    shutil.copytree(SHIPPED[DEFAULT_MODEL], corrupt)
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:5000])
    (d / "random.pth").write_bytes(b"\x13" + bytes(range(256)) * 20)
    with open(d / "evil.pth", "wb") as handle:
        pickle.dump({"model": _Evil()}, handle, protocol=2)
    (d / "cut.safetensors").write_bytes(TRAINING_GOLDEN.read_bytes()[:100_000])
    (d / "bad.yaml").write_text("model: [unclosed\n")
    for name, refs in (("evil", pickle.dumps([_Evil()], protocol=2)), ("deep", _nested(200_000))):
        root = d / name / "refcoco"
        root.mkdir(parents=True)
        shutil.copy(MINI / "refcoco" / "instances.json", root / "instances.json")
        (root / "refs(unc).p").write_bytes(refs)
    real = [json.loads(line) for line in (COCO / "refcoco-real.jsonl").read_text().splitlines()[:2]]
    for record in real:
        record["image"] = str(COCO / record["image"])
    (d / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in real))
    (d / "bad-json.jsonl").write_text('{"image": "x.jpg", \n')
    (d / "no-field.jsonl").write_text(
        json.dumps({k: v for k, v in real[0].items() if k != "sentences"}) + "\n"
    )
    (d / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    wrong = dict(real[0], mask={"rle": {"size": [3, 3], "counts": "9"}})
    (d / "mask-size.jsonl").write_text(json.dumps(wrong) + "\n")
    instances = json.loads((COCO / "instances.json").read_text())
    keep = instances["images"][:2]
    instances["images"] = keep
    instances["annotations"] = [
        a for a in instances["annotations"] if a["image_id"] in {i["id"] for i in keep}
    ]
    instances["annotations"][0]["category_id"] = 999
    (d / "bad-category.json").write_text(json.dumps(instances))
    (d / "empty-predictions").mkdir()
    for record in real:  # square masks for photos that are not square
        for k in range(len(record["sentences"])):
            path = d / "square-predictions" / f"{record['id']}:{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (50, 50), 255).save(path)
    return d


# One line a case (the table is wider than the code around it):
# (id, argv with {d} for the files folder and {out} for a fresh output path, expected exit, words on stderr)
CASES = [
    ("predict-missing-image", "predict --image {d}/none.jpg --text dog --out {out}", 2, "image not found"),
    ("predict-corrupt-image", "predict --image {d}/random.jpg --text dog --out {out}", 2, "cannot decode image"),
    ("predict-bomb", "predict --image {d}/bomb.png --text dog --out {out}", 2, "decompression bomb"),
    ("predict-tiny-image", "predict --image {d}/tiny.png --text dog --out {out}", 2, "tiny.png"),
    ("predict-empty-text", "predict --image {photo} --text '' --out {out}", 2, "empty expression"),
    ("predict-blank-text", "predict --image {photo} --text '   ' --out {out}", 2, "empty expression"),
    ("predict-url", "predict --image https://example.com/a.jpg --text dog --out {out}", 2, "https://example.com/a.jpg: a URL"),
    ("predict-out-is-file", "predict --image {photo} --text dog --out {d}/afile", 2, "is a file, expected a folder"),
    ("predict-out-in-proc", "predict --image {photo} --text dog --out /proc/lgformer", 2, "cannot write there"),
    ("predict-out-under-file", "predict --image {photo} --text dog --out {d}/afile/x", 2, "is a file, not a folder"),
    ("predict-no-checkpoint", "predict --checkpoint {d}/nowhere --image {photo} --text dog --out {out}", 2, "neither a folder nor a shipped model"),
    ("predict-not-a-checkpoint", "predict --checkpoint {d}/no-config --image {photo} --text dog --out {out}", 2, "not a checkpoint folder"),
    ("predict-corrupt-weights", "predict --checkpoint {d}/corrupt-ckpt --image {photo} --text dog --out {out}", 2, "model.safetensors: cannot load"),
    ("predict-threshold", "predict --image {photo} --text dog --threshold 5 --out {out}", 2, "threshold 5"),
    (
        "predict-no-target-threshold",
        "predict --image {photo} --text dog --no-target-threshold 0 --out {out}",
        2,
        "--no-target-threshold 0.0: must be strictly between 0 and 1",
    ),
    ("predict-image-size", "predict --image {photo} --text dog --set data.image_size=0 --out {out}", 2, "data.image_size=0"),
    ("predict-unknown-key", "predict --image {photo} --text dog --set model.nope=1 --out {out}", 2, "unknown key 'nope'"),
    ("predict-fp16-cpu", "predict --image {photo} --text dog --dtype fp16 --device cpu --out {out}", 2, "fp16"),
    ("predict-gray-ok", "predict --image {d}/gray.png --text 'the teddy bear' --out {out}", 0, ""),
    ("predict-rgba-ok", "predict --image {d}/rgba.png --text 'the teddy bear' --out {out}", 0, ""),
    ("serve-port-range", "serve --port 99999", 2, "--port 99999: expected 1 to 65535"),
    ("serve-unknown-host", "serve --host nosuchhost.invalid", 2, "--host nosuchhost.invalid --port 7860: cannot serve there"),
    ("serve-max-upload", "serve --max-upload-mb 0", 2, "--max-upload-mb 0.0: expected a positive size"),
    ("eval-both-sources", "eval --checkpoint lite --predictions {d} --root {d}/ok.jsonl", 2, "exactly one of"),
    ("eval-no-predictions-folder", "eval --predictions {d}/nowhere --root {d}/ok.jsonl --split val", 2, "not a folder"),
    ("eval-predictions-no-root", "eval --predictions {d}/empty-predictions", 2, "needs --root"),
    ("eval-missing-predictions", "eval --predictions {d}/empty-predictions --root {d}/ok.jsonl --split val", 2, "no prediction for"),
    ("eval-out-is-file", "eval --checkpoint lite --root {d}/ok.jsonl --out {d}/afile", 2, "is a file, expected a folder"),
    ("eval-unknown-split", "eval --predictions {d}/empty-predictions --root {d}/ok.jsonl --split nosuch", 2, "no referents in split 'nosuch'"),
    ("train-out-is-file", "train --config lite --out {d}/afile", 2, "is a file, expected a folder"),
    ("train-negative-batch", "train --config lite --set train.batch_size=-4 --out {out}", 2, "train.batch_size=-4; it must be at least 1"),
    ("train-negative-size", "train --config lite --set data.image_size=-5 --out {out}", 2, "data.image_size=-5"),
    ("train-decoder-heads", "train --config lite --set model.decoder_heads=7 --out {out}", 2, "model.decoder_heads=7; it must divide model.decoder_dim=128"),
    ("train-generator-heads", "train --config lite --set model.generator_heads=0 --out {out}", 2, "model.generator_heads=0; it must divide"),
    ("train-fusion-heads", "train --config lite --set 'model.fusion_heads=[5,1,1,1]' --set data.root={d}/ok.jsonl --set data.dataset=jsonl --set train.train_split=val --set train.batch_size=2 --out {out}", 2, "model.fusion_heads[0]=5; it must divide the stage's width 24"),
    ("train-no-config", "train --out {out}", 2, "give --config and --out"),
    ("train-unknown-config", "train --config nowhere.yaml --out {out}", 2, "neither a preset"),
    ("train-bad-yaml", "train --config {d}/bad.yaml --out {out}", 2, "not valid YAML"),
    ("train-bad-amp", "train --config lite --set train.amp=maybe --set data.root={d}/ok.jsonl --set data.dataset=jsonl --out {out}", 2, "train.amp='maybe'"),
    ("train-resume-nothing", "train --resume {d}/no-config", 2, "not a checkpoint folder"),
    ("stats-missing-root", "data stats --root {d}/nowhere --dataset refcoco", 2, "instances.json: file not found"),
    ("check-pickle-global", "data check --root {d}/evil --dataset refcoco --split-by unc", 2, "refused pickle global"),
    ("check-pickle-deep", "data check --root {d}/deep --dataset refcoco --split-by unc", 2, "nested too deeply"),
    ("stats-jsonl-bad-json", "data stats --root {d}/bad-json.jsonl", 2, "bad-json.jsonl:1: not valid JSON"),
    ("stats-jsonl-no-field", "data stats --root {d}/no-field.jsonl", 2, "missing field 'sentences'"),
    ("stats-jsonl-deep", "data stats --root {d}/deep.jsonl", 2, "nested too deeply"),
    ("stats-jsonl-mask-size", "data stats --root {d}/mask-size.jsonl", 2, "RLE size [3, 3] differs"),
    ("stats-jsonl-ok", "data stats --root {d}/ok.jsonl --tokenizer minilm", 0, ""),
    ("eval-stretched-predictions", "eval --predictions {d}/square-predictions --root {d}/ok.jsonl --split val --protocol original", 0, "another aspect ratio"),
    ("export-out-is-folder", "data export-jsonl --root {d}/ok.jsonl --out {d}", 2, "is a folder, expected a file name"),
    ("synth-negative-seed", "data synth --out {out} --train 3 --seed -1", 2, "--seed -1: expected a whole number >= 0"),
    ("synth-no-workers", "data synth --out {out} --train 3 --workers 0", 2, "--workers 0: expected a whole number >= 1"),
    ("synth-too-large", "data synth --out {out} --train 3 --size 100000", 2, "image size 100000 is too large (at most 2048)"),
    ("instances-negative-seed", "data from-instances --instances {coco}/instances.json --images {coco}/images --out {out} --seed -2", 2, "--seed -2: expected a whole number >= 0"),
    ("eval-batch-size", "eval --checkpoint lite --root {d}/ok.jsonl --split val --batch-size 0", 2, "--batch-size 0: expected a whole number >= 1"),
    ("demo-eval-refs", "demo --eval-refs 0 --out {out}", 2, "--eval-refs 0: expected a whole number >= 1"),
    ("demo-steps", "demo --train --steps -1 --out {out}", 2, "--steps -1: expected a whole number >= 1"),
    ("synth-too-small", "data synth --out {out} --train 3 --size 10", 2, "too small"),
    ("synth-out-is-file", "data synth --out {d}/afile --train 3", 2, "is a file, expected a folder"),
    ("instances-missing", "data from-instances --instances {d}/none.json --images {d} --out {out}", 2, "none.json: file not found"),
    ("instances-bad-category", "data from-instances --instances {d}/bad-category.json --images {coco}/images --out {out}", 2, "unknown category_id 999"),
    ("convert-random-bytes", "convert official {d}/random.pth --out {out}", 2, "not a torch.save file"),
    ("convert-pickle-code", "convert official {d}/evil.pth --out {out}", 2, "refused to run pickle code"),
    ("convert-out-is-file", "convert official {d}/evil.pth --out {d}/afile", 2, "is a file, expected a folder"),
    ("verify-missing-golden", "verify-official {d}/none.safetensors --variant tiny-w7", 2, "not found"),
    ("verify-training-truncated", "verify-official-training {d}/cut.safetensors --variant tiny-w7", 2, "cannot load the training golden"),
    ("verify-training-write-folder", "verify-official-training {golden} --variant tiny-w7 --write {d}", 2, "is a folder, expected a file name"),
    ("export-onnx-out-is-folder", "export onnx --out {d}", 2, "is a folder, expected a file name"),
    ("summary-size-zero", "summary --size 0", 2, "data.image_size=0; it must be at least 32 pixels"),
    ("bench-size-small", "bench --size 7", 2, "data.image_size=7; it must be at least 32 pixels"),
    ("export-onnx-size-zero", "export onnx --size 0 --out {out}.onnx", 2, "--size 0: too small (at least 32)"),
    ("export-onnx-tokens-zero", "export onnx --max-tokens 0 --out {out}.onnx", 2, "--max-tokens 0: must be between 2"),
]  # fmt: skip


def _check_success(name: str, files: Path, out: Path, stdout: str) -> None:
    """What a succeeding case must have produced: a grey or RGBA photo gives the full-size 0/255 mask of the
    object it names; `data stats` counts the file's sentences."""
    if name.startswith("predict-"):
        (record,) = json.loads((out / "predictions.json").read_text())["predictions"]
        mask = np.asarray(Image.open(out / record["mask"]))
        assert (record["width"], record["height"]) == Image.open(PHOTO).size and mask.shape == (480, 640)
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert record["area"] == int((mask == 255).sum()) > 0 and not record["no_target"], record
    elif name == "stats-jsonl-ok":
        records = [json.loads(line) for line in (files / "ok.jsonl").read_text().splitlines()]
        count = sum(len(record["sentences"]) for record in records)
        assert (
            f"refs               {len(records)}\n" in stdout and f"sentences          {count}\n" in stdout
        ), stdout


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(files: Path, tmp_path: Path, case: tuple[str, str, int, str]) -> None:
    name, template, code, words = case
    out = tmp_path / "out"
    values = {"d": files, "out": out, "photo": PHOTO, "coco": COCO, "golden": TRAINING_GOLDEN}
    argv = shlex.split(template.format(**values))
    done = subprocess.run(
        [sys.executable, "-m", "lgformer.cli", *argv], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == code, done.stderr[-2000:]
    if code:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0], done.stderr
    else:  # succeeds, with the warning named where there is one, and writes what it should
        assert words in done.stderr, done.stderr
        _check_success(name, files, out, done.stdout)
    # nothing half-written: no output folder for a refusal, and never a temporary file left behind
    if code and out.exists():
        assert not list(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert not [p for p in files.rglob(".*") if p.name.startswith((".afile", ".lgformer-probe"))]
