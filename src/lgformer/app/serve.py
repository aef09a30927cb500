"""`lgformer serve`: a Gradio page: upload an image (or pick an example), type an expression, see the overlay
and the mask, download the mask PNG.

The upload is a plain file field, so that our decoder (`load_image`: corrupt files, decompression bombs) and
not Gradio's sees every file, and its message is what the user reads: a bad upload or expression raises
`gr.Error` (a visible notice) and the server keeps serving. Uploads above `max_upload_mb` are refused by
Gradio itself and checked again here. The server binds to loopback unless told otherwise; analytics and
version checks are off (no network calls).
"""

from __future__ import annotations

import signal
import socket
import tempfile
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any

from lgformer.app.predict import describe
from lgformer.errors import LGFormerError
from lgformer.predictor import InputWarning, Segmenter, read_image
from lgformer.render import mask_image, overlay, save_png

TITLE = "LGFormer: referring image segmentation"
EXAMPLE_SEED = 7
EXAMPLE_SIZE = 320


def write_examples(folder: Path, sets: bool = False) -> list[list[str]]:
    """One synthetic scene per complexity level (from the data package's generator) with one of its
    expressions: [image path, sentence] rows for `gr.Examples`; with `sets` (a model with the no-target
    head) also the first expression naming several objects and the first naming nothing among them."""
    from lgformer.data.synth.generate import make_scene

    rows, kinds = [], {}
    for index in range(4):  # scene i is made for level 1 + i % 4
        plural = absent = 1.0 if sets else 0.0
        scene = make_scene(EXAMPLE_SEED, "test", index, EXAMPLE_SIZE, 1, plural=plural, absent=absent)
        path = folder / f"level{scene.level}.jpg"
        path.write_bytes(scene.jpeg)
        rows.append([str(path), scene.refs[0][1][0]])
        for members, texts in scene.sets:
            kinds.setdefault(bool(members), [str(path), texts[0]])
    return rows + [kinds[k] for k in (True, False) if k in kinds]


def build_app(seg: Segmenter, workdir: Path, max_upload_mb: float) -> Any:
    """The Gradio Blocks page around `seg`; examples and mask downloads are written under `workdir`."""
    try:
        import gradio as gr
    except ImportError:
        raise LGFormerError("the web page needs gradio: pip install 'lgformer[serve]'") from None

    limit = int(max_upload_mb * 1024 * 1024)

    def notice(message: str) -> Exception:
        """A visible error notice; a user's bad input is no server fault, so no traceback in the log."""
        return gr.Error(message, print_exception=False)

    def read(path: str | None) -> Any:
        if path is None:
            return None
        file = Path(path)
        try:
            if file.stat().st_size > limit:
                size = file.stat().st_size / 2**20
                raise LGFormerError(f"{file.name}: {size:.1f} MB is over the {max_upload_mb:g} MB limit")
            return read_image(file)
        except LGFormerError as exc:
            raise notice(str(exc).replace(str(file), file.name)) from None  # the user's name, not ours

    def segment(path: str | None, sentence: str, threshold: float) -> tuple[Any, Any, str, str]:
        if path is None:
            raise notice("upload an image first (or pick an example below)")
        picture = read(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InputWarning)
            try:
                pred = seg.predict(picture, sentence, threshold)
            except LGFormerError as exc:
                raise notice(str(exc)) from None
        notes = [str(w.message) for w in caught]
        for note in notes:
            gr.Warning(note)
        summary = describe(pred)
        mask = mask_image(pred.mask)
        mask_path = save_png(
            workdir / uuid.uuid4().hex / f"{Path(path).stem}_mask.png", mask
        )  # one per request
        headline = (
            f"**Nothing matches** {sentence!r} in this image ({summary})"
            if pred.no_target
            else f"**{summary}**, box (x, y, w, h) {pred.bbox}"
        )
        status = "\n".join([headline, *(f"- {n}" for n in notes)])
        return overlay(picture, pred.mask, sentence, summary), mask, str(mask_path), status

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nUpload an image, describe one object in it, press **Segment**.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                preview = gr.Image(label="Your image", interactive=False, type="pil", elem_id="preview")
                sentence = gr.Textbox(
                    label="Expression", placeholder="the red circle left of the square", elem_id="sentence"
                )
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Threshold (probability)")
                # what the API sends reaches `Segmenter.predict`, which refuses a threshold outside (0, 1) in
                # a notice: gradio's own bounds check would log a traceback for it
                threshold.preprocess = float
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                result = gr.Image(label="Overlay", type="pil", interactive=False, elem_id="overlay")
                mask = gr.Image(label="Mask", type="pil", interactive=False, image_mode="L", elem_id="mask")
                download = gr.File(label="Mask PNG", elem_id="download")
                status = gr.Markdown(elem_id="status")
        examples = write_examples(workdir, sets=seg.model.target_head is not None)
        label = "Examples (synthetic scenes)"
        gr.Examples(examples, inputs=[upload, sentence], label=label, elem_id="examples")
        upload.change(read, inputs=upload, outputs=preview)
        for trigger in (button.click, sentence.submit):
            trigger(segment, inputs=[upload, sentence, threshold], outputs=[result, mask, download, status])
    return app


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the server stops as on Ctrl-C, and the temporary folder is removed


def check_address(host: str, port: int) -> None:
    """Fail early, in one line, where the page could not be served: a port out of range, an unknown host,
    or an address already taken (checked by binding it for a moment)."""
    if not 1 <= port <= 65535:
        raise LGFormerError(f"--port {port}: expected 1 to 65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or exc
        raise LGFormerError(f"--host {host} --port {port}: cannot serve there ({reason})") from None


def serve(seg: Segmenter, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 20.0) -> None:
    """Serve the page until interrupted (Ctrl-C or SIGTERM: the server closes, its temporary folder goes)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="lgformer-serve-") as tmp:
        workdir = Path(tmp)
        app = build_app(seg, workdir, max_upload_mb)
        app.queue().launch(
            server_name=host,
            server_port=port,
            max_file_size=f"{int(max_upload_mb * 1024)}kb",
            allowed_paths=[str(workdir)],
            show_error=True,
            share=False,
        )
