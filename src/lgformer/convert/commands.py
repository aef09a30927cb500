"""`lgformer convert official`, `lgformer verify-official`, `lgformer verify-official-training` and
`lgformer export onnx`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lgformer.arguments import add_device_argument, add_overrides_argument
from lgformer.files import check_output_file, check_output_folder
from lgformer.shipped import DEFAULT_MODEL


def register(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="convert checkpoints between the authors' layout and ours")
    conv_sub = conv.add_subparsers(dest="source", metavar="SOURCE", required=True)
    off = conv_sub.add_parser("official", help="the authors' released LGFormer .pth -> our checkpoint folder")
    off.add_argument("checkpoint", help="the authors' checkpoint file (torch.save dict with 'model')")
    off.add_argument("--out", required=True, help="output checkpoint folder")
    off.add_argument(
        "--text-encoder",
        default="bert-base-uncased",
        help="tokenizer/architecture name of the BERT (default %(default)s)",
    )
    off.set_defaults(handler=_convert_official)

    ver = sub.add_parser(
        "verify-official", help="reproduce the authors' golden forward pass (exit 0 iff <= 1e-4)"
    )
    ver.add_argument("golden", help="golden .safetensors (image, text_features, text_mask, logits_i)")
    ver.add_argument("--variant", required=True, choices=["tiny-w7", "small-w7", "base-w12", "large-w12"])
    add_device_argument(ver)
    ver.set_defaults(handler=_verify_official)

    vt = sub.add_parser(
        "verify-official-training",
        help="the authors' recorded training steps taken by our training code (exit 0 iff all checks pass)",
    )
    vt.add_argument("golden", help="training golden .safetensors (shared/reference/official-training)")
    vt.add_argument("--variant", required=True, choices=["tiny-w7", "small-w7", "base-w12", "large-w12"])
    vt.add_argument("--write", default=None, help="also store our run in the golden's format to this file")
    vt.add_argument(
        "--device-batch",
        type=int,
        default=None,
        help="micro-batch per process (default: the batch split over processes; smaller = accumulation)",
    )
    vt.add_argument(
        "--steps",
        type=int,
        default=3,
        help="take only the first 1-3 recorded steps and run their checks (default: all 3)",
    )
    add_overrides_argument(vt, "config override, e.g. train.freeze_bert_embeddings=false (repeatable)")
    add_device_argument(vt)
    vt.set_defaults(handler=_verify_official_training)

    p = sub.add_parser("export", help="export a checkpoint to another runtime")
    export_sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = export_sub.add_parser(
        "onnx",
        help="ONNX graph (image, ids, attention_mask) -> logits, checked with ONNX Runtime",
        description="Opset 18. Inputs: image float32 (batch, 3, S, S) normalised, ids and attention_mask "
        "int64 (batch, tokens); output: logits float32 (batch, S, S), > 0 = mask. Dynamic axes: batch and "
        "tokens (2..--max-tokens). The file is written only if ONNX Runtime matches PyTorch within 1e-3.",
    )
    p.add_argument(
        "--checkpoint", default=DEFAULT_MODEL, help="checkpoint folder or shipped model (default %(default)s)"
    )
    p.add_argument("--out", type=Path, required=True, help="output .onnx file")
    p.add_argument(
        "--size", type=int, default=None, help="input size S (default: the checkpoint's image size)"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="longest token axis (default: the model's)")
    p.add_argument("--check-image", type=Path, help="photo for the parity check (default: a synthetic scene)")
    p.add_argument("--check-text", help="sentence for the parity check (default: the scene's expression)")
    p.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="skip onnxscript's graph rewriting: a faster export of a large model (ONNX Runtime still "
        "optimises the graph at load)",
    )
    p.set_defaults(handler=_export_onnx)


def _convert_official(args: argparse.Namespace) -> int:
    from lgformer import config as config_mod
    from lgformer.checkpoint import save_model
    from lgformer.convert.official import from_official, infer_preset, load_official_checkpoint
    from lgformer.model.build import build_model

    check_output_folder(args.out)
    state = load_official_checkpoint(args.checkpoint)
    preset, window = infer_preset(state)
    cfg = config_mod.preset(preset)
    cfg.model.window = window
    cfg.model.text_encoder = args.text_encoder
    model = build_model(cfg.model, pretrained=False)
    model.load_state_dict(from_official(state, model))
    save_model(args.out, model, cfg, extra={"source": f"authors' checkpoint {args.checkpoint}"})
    print(f"converted {args.checkpoint} ({preset}, window {window}) -> {args.out}")
    return 0


def _verify_official(args: argparse.Namespace) -> int:
    from lgformer.convert.verify import TOLERANCE, verify_official
    from lgformer.engine.distributed import setup

    _, device = setup(args.device)
    diffs = verify_official(args.golden, args.variant, device=device)
    for name, diff in diffs.items():
        print(f"{name} max_abs_diff={diff:.3e}")
    worst = max(diffs.values())
    print(f"max_abs_diff={worst:.3e}")
    return 0 if worst <= TOLERANCE else 1


def _verify_official_training(args: argparse.Namespace) -> int:
    from lgformer.convert.verify_training import candidate, compare, read_golden, write_candidate

    if args.write:
        check_output_file(args.write, "--write")

    golden, meta = read_golden(args.golden, args.variant)
    result = candidate(
        golden, args.variant, args.device, args.device_batch, tuple(args.overrides), args.steps
    )
    if result is None:  # not the first process
        return 0
    tensors, cand_meta = result
    if args.write:
        write_candidate(args.write, tensors, cand_meta)
    checks = compare(tensors, cand_meta, golden, meta)
    for check in checks:
        print(check.line())
    passed = all(c.passed for c in checks)
    if args.steps < 3:
        print(f"(only the checks of the first {args.steps} step(s) ran: --steps {args.steps})")
    print(f"training_golden={'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def _export_onnx(args: argparse.Namespace) -> int:
    from lgformer.files import check_output_file

    check_output_file(args.out)
    from lgformer.convert.onnx import OPSET, export_onnx, synthetic_check_input
    from lgformer.predictor import Segmenter, encode_sentences, read_image

    if args.check_image is not None:
        image, sentence = read_image(args.check_image), args.check_text or "the object in the middle"
    else:
        image, sentence = synthetic_check_input()
        sentence = args.check_text or sentence
    seg = Segmenter.from_pretrained(args.checkpoint, device="cpu")
    encode_sentences(seg.tokenizer, [sentence])
    diff = export_onnx(
        seg.model, seg.cfg, args.out, image, sentence, args.size, args.max_tokens, optimize=args.optimize
    )
    size = seg.image_size if args.size is None else args.size
    print(
        f"wrote {args.out} (opset {OPSET}, input {size}x{size}, dynamic batch and tokens); "
        f"ONNX Runtime vs PyTorch max abs logit difference {diff:.2e}"
    )
    return 0
