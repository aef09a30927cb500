"""`lgformer serve` in a real headless browser: Debian's chromium driven by selenium through chromium-driver
(never a downloaded browser). The server runs as its own process, as a user starts it; every bad upload or
expression shows a visible message and the server keeps serving."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, bomb_png_header, head_checkpoint
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from lgformer import config as config_mod
from lgformer.app.serve import EXAMPLE_SEED, EXAMPLE_SIZE, write_examples
from lgformer.checkpoint import save_model
from lgformer.cli import main
from lgformer.model.build import build_model

# Debian's browser (`make test` installs chromium + chromium-driver), found on PATH; never a downloaded one.
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = "chromium and chromedriver are not on PATH (`make test` installs Debian's chromium-driver)"
PHOTO = PHOTOS / "COCO_train2014_000000460370.jpg"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    (folder / "notes.jpg").write_text("a text file with an image's name\n")
    (folder / "cut.jpg").write_bytes(PHOTO.read_bytes()[:20000])
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    (folder / "bomb.png").write_bytes(bomb_png_header())
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "large.png")  # about 1.9 MB, over the 1 MB limit below
    return {p.name: p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Where gradio's uploads and the server's own temporary folder go (its TMPDIR)."""
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def serve_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("log") / "serve.log"


@contextlib.contextmanager
def serving(checkpoint: Path, scratch: Path, log: Path):
    """`lgformer serve` of `checkpoint` on a free loopback port, 1 MB upload limit; yields (url, process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(scratch), "TMPDIR": str(scratch)}
    argv = [
        sys.executable,
        "-m",
        "lgformer.cli",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*argv, "--max-upload-mb", "1", "--device", "cpu"], stdout=out, stderr=out, env=env
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not up after 120 s:\n{log.read_text()[-3000:]}"
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory, scratch, serve_log):
    """`lgformer serve`: lite checkpoint (untrained heads)."""
    cfg = config_mod.load("lite", ["data.image_size=128"])
    checkpoint = tmp_path_factory.mktemp("lite")
    save_model(checkpoint, build_model(cfg.model, pretrained=True), cfg, exclude=("text_encoder.",))
    with serving(checkpoint, scratch, serve_log) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(NO_BROWSER)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, css: str, timeout: float = 60):
    return WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))


def _open(driver, url: str, upload: Path | None = None) -> None:
    """Load the page and wait until it is whole (the examples table is drawn last), then upload `upload`."""
    driver.get(url)
    field = _wait(driver, "#upload input[type=file]")[0]
    _wait(driver, "#examples td")
    if upload is not None:
        field.send_keys(str(upload))


def _segment(driver, sentence: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "#sentence textarea").send_keys(sentence)
    driver.find_element(By.CSS_SELECTOR, "#segment").click()


def _notices(driver, expected: str, timeout: float = 30) -> str:
    """The text of the notices (toasts) on screen, once one holds `expected` (or at the timeout)."""

    def text(d) -> str:
        return " | ".join(
            t.text.replace("\n", " ") for t in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
        )

    try:
        WebDriverWait(driver, timeout).until(lambda d: expected in text(d))
    except TimeoutException:
        pass
    return text(driver)


def test_upload_a_photo_type_an_expression_see_the_overlay(server, browser):
    url, _ = server
    _open(browser, url, PHOTO)
    _wait(browser, "#preview img")
    _segment(browser, "the man texting on his phone")
    overlay = _wait(browser, "#overlay img")[0]
    assert overlay.get_attribute("src") and _wait(browser, "#mask img")
    link = _wait(browser, "#download a[download]")[0].get_attribute("href")
    with urllib.request.urlopen(link, timeout=10) as response:
        mask = Image.open(response)
        mask.load()
    assert mask.size == (640, 427) and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert "score" in browser.find_element(By.CSS_SELECTOR, "#status").text


def test_pick_an_example(server, browser):
    url, _ = server
    _open(browser, url)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.XPATH, "//td[contains(., 'level2.jpg')]"))
    browser.find_element(By.XPATH, "//td[contains(., 'level2.jpg')]").click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#sentence textarea").get_attribute("value")
    )
    browser.find_element(By.CSS_SELECTOR, "#segment").click()
    assert _wait(browser, "#overlay img")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("notes.jpg", "notes.jpg: cannot decode image"),
        ("cut.jpg", "cut.jpg: cannot decode image"),
        ("dot.png", "dot.png: 1x1 image is too small"),
        ("bomb.png", "decompression bomb"),
        ("large.png", "exceed the maximum allowed size of 1.0 Mb"),
    ],
)
def test_bad_uploads_show_a_message(server, browser, files, name, message):
    url, proc = server
    # a loaded CI machine has missed the browser's own size notice once (gradio checks the size in the page
    # and the toast never came within 30 s); a second upload on a fresh page tells that from a real failure
    for _attempt in range(2):
        _open(browser, url, files[name])
        if message in _notices(browser, message):
            break
    assert message in _notices(browser, message, timeout=1)
    assert proc.poll() is None


@pytest.mark.parametrize(
    ("sentence", "message", "overlay"),
    [
        ("   ", "empty expression", False),
        ("🙂🚗", "no word the model knows", False),
        (" ".join(["word"] * 500), "reads only the first 20, i.e. the first 19 of 500 words", True),
        ("le café à gauche 🚗", "'🚗' not in the model's vocabulary", True),
    ],
)
def test_bad_expressions_show_a_message(server, browser, sentence, message, overlay):
    url, _ = server
    _open(browser, url, PHOTO)
    _wait(browser, "#preview img")
    _segment(browser, sentence)
    assert message in _notices(browser, message)
    if overlay:  # read in part: a warning, and the prediction still comes
        assert _wait(browser, "#overlay img")


def test_the_server_keeps_serving(server, browser):
    url, proc = server
    _open(browser, url, PHOTO)
    _wait(browser, "#preview img")
    _segment(browser, "the train")
    assert _wait(browser, "#overlay img") and proc.poll() is None


def test_binds_to_loopback_only(server):
    """The listening socket is 127.0.0.1:<port> (read from the kernel's table, no traffic sent)."""
    url, _ = server
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    listening = [
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port
    ]
    assert listening and all(addr.startswith("0100007F:") for addr in listening)


def test_a_threshold_outside_0_1_through_the_api_is_a_message_not_a_traceback(server, serve_log):
    """The page's API takes any number for the slider: the client is told, the server log stays clean."""
    from gradio_client import Client, handle_file

    url, _ = server
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match=r"threshold 5(\.0)? must be strictly between 0 and 1"):
        client.predict(handle_file(str(PHOTO)), "the train", 5, api_name="/segment")
    assert "Traceback" not in serve_log.read_text()


def test_sigterm_stops_the_server_and_removes_its_temporary_folder(server, scratch):
    """Last in this file: SIGTERM (what a service manager sends) closes the server as Ctrl-C does, and the
    folder it keeps the masks and examples in goes with it."""
    _, proc = server
    assert list(scratch.glob("lgformer-serve-*"))  # the running server's folder
    proc.terminate()
    proc.wait(timeout=60)
    assert not list(scratch.glob("lgformer-serve-*"))


def test_nothing_matches_is_said_on_the_page(tmp_path_factory, browser):
    """A model with the no-target head that answers "nothing" (its last layer fixed: see
    tests/test_no_target.py) makes the page say so in words, with an empty mask."""
    checkpoint = head_checkpoint(tmp_path_factory.mktemp("nothing"), -20.0)
    scratch, log = tmp_path_factory.mktemp("scratch-nothing"), tmp_path_factory.mktemp("log") / "serve.log"
    with serving(checkpoint, scratch, log) as (url, _):
        _open(browser, url, PHOTO)
        _wait(browser, "#preview img")
        _segment(browser, "the giraffe")
        WebDriverWait(browser, 60).until(
            lambda d: "Nothing matches" in d.find_element(By.CSS_SELECTOR, "#status").text
        )
        status = browser.find_element(By.CSS_SELECTOR, "#status").text
        assert "'the giraffe'" in status and "match probability 0.00" in status
        table = browser.find_element(By.CSS_SELECTOR, "#examples").text  # a plural and an absent example
        sets = [sentence for _, sentence in write_examples(tmp_path_factory.mktemp("ex"), sets=True)[4:]]
        assert len(sets) == 2 and all(sentence in table for sentence in sets), (sets, table)
        link = _wait(browser, "#download a[download]")[0].get_attribute("href")
        with urllib.request.urlopen(link, timeout=10) as response:
            mask = np.asarray(Image.open(response))
        assert mask.shape == (427, 640) and not mask.any()


def test_a_model_with_the_head_gets_a_plural_and_an_absent_example(tmp_path):
    """The examples of a model with the no-target head end with an expression naming several objects of one
    of the example scenes and one naming nothing in it, as the generator (verified by its interpreter) made
    them; a model without the head gets the four classic ones."""
    from lgformer.data.synth.generate import make_scene

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    classic, both = write_examples(tmp_path / "a"), write_examples(tmp_path / "b", sets=True)
    assert len(classic) == 4 and both[:4] == [[row[0].replace("/a/", "/b/"), row[1]] for row in classic]
    assert len(both) == 6
    for (path, sentence), plural in zip(both[4:], (True, False)):
        index = int(Path(path).stem.removeprefix("level")) - 1  # scene i is of level 1 + i % 4
        scene = make_scene(EXAMPLE_SEED, "test", index, EXAMPLE_SIZE, 1, plural=1.0, absent=1.0)
        members = {texts[0]: m for m, texts in scene.sets}[sentence]
        assert len(members) >= 2 if plural else members == ()


def test_a_taken_port_is_a_one_line_error_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", "/nowhere", "--port", str(port)]) == 2
    err = capsys.readouterr().err  # the address is refused before the (missing) checkpoint is looked for
    expected = f"--host 127.0.0.1 --port {port}: cannot serve there (Address already in use)"
    assert err == f"lgformer serve: error: {expected}\n"
