"""`latentdiff serve` driven in a real headless browser (Debian's chromium through Playwright): the page's PNGs
are the CLI's, bad input gets the CLI's message, two visitors at once get their seeds' images, cancel stops a
generation, uploads are checked, and the picker offers a converted SD pipeline and refuses mismatched stages."""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_stages import save_autoencoder, save_stages

from latentdiff.cli import main
from latentdiff.png_info import read_png_params
from latentdiff.serve.render import EDIT_CHUNK

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STATUS = "#status [data-testid=markdown]"  # the status line's text (not gradio's progress overlay)
MISSING = [what for what, present in [
    ("the ui extra (pip install -e '.[ui]')", find_spec("gradio")),
    ("playwright (pip install -e '.[test]')", find_spec("playwright")),
    (f"{CHROMIUM} (apt-get install chromium; .ci/run does)", os.access(CHROMIUM, os.X_OK))] if not present]
if not MISSING:
    from playwright import sync_api


def test_serve_imports_gradio_only_when_it_runs_and_says_when_it_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # any import of it fails
    assert main(["serve", "--pipeline", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err == 'latentdiff serve: error: the web page needs the ui extra: pip install -e ".[ui]" (or pip ' \
                  'install gradio)\n'


def test_the_page_memory_limit_refuses_before_any_work(tmp_path):
    from latentdiff.errors import ConfigError
    from latentdiff.serve.picker import PipelineCatalog
    from latentdiff.serve.render import Fields, render

    entry = PipelineCatalog([str(save_stages(tmp_path)["unet"])], "cpu").get(str(tmp_path / "diffusion"))
    fields = Fields("a red circle", count=4, seed=0)
    options = dict(max_upload=2 ** 20, on_step=lambda i, n: pytest.fail("sampling started"), cancelled=lambda: False)
    with pytest.raises(ConfigError, match=r"^4 image\(s\) of 16x16 would need about .*, more than the memory limit "
                                          r"of 1.0 MiB: ask for a smaller size or fewer images$"):
        render(entry, fields, tmp_path / "out", memory_limit=2 ** 20, **options)
    assert not (tmp_path / "out").exists()


def test_a_painted_layer_is_the_mask():
    from latentdiff.serve.render import drawn_mask

    layer = Image.new("RGBA", (4, 4))
    assert drawn_mask([layer]) is None and drawn_mask(None) is None  # nothing painted
    layer.putpixel((1, 2), (255, 255, 255, 40))  # any opacity repaints
    assert np.array_equal(np.argwhere(np.asarray(drawn_mask([Image.new("RGBA", (4, 4)), layer])) == 255), [[2, 1]])


def require_browser():
    if MISSING:
        pytest.skip("needs " + ", ".join(MISSING))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny trained-style run folder (given with --pipeline), and under weights/ a converted SD 1.x pipeline
    and a pipeline whose autoencoder is not the one its UNet was trained with."""
    require_browser()
    from tiny_sd import save_diffusers_pipeline

    from latentdiff.convert import load_diffusers
    from latentdiff.pipeline import Text2ImagePipeline

    root = tmp_path_factory.mktemp("serve")
    tiny = save_stages(root / "tiny")["unet"]
    weights = root / "weights"
    load_diffusers(save_diffusers_pipeline("sd1", root / "sd1-diffusers")).save_pretrained(weights / "sd1")
    Text2ImagePipeline.from_pretrained(tiny).save_pretrained(weights / "mismatched")
    shutil.rmtree(weights / "mismatched" / "autoencoder")
    save_autoencoder(weights / "mismatched" / "autoencoder", seed=5)
    return {"tiny": str(tiny), "weights": weights, "sd1": str(weights / "sd1"),
            "mismatched": str(weights / "mismatched"), "out": root / "out", "root": root}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(folders):
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folders["root"] / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_WAIT_POLICY": "passive"}
    command = [sys.executable, "-m", "latentdiff.cli", "serve", "--pipeline", folders["tiny"], "--weights",
               str(folders["weights"]), "--port", str(port), "--out", str(folders["out"]), "--max-upload", "100KB"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"latentdiff serve did not start:\n{process.stdout.read()}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    require_browser()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url):
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.goto(url)
    page.wait_for_selector("#prompt textarea")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.context.close()


def fill(page, **fields):
    """Type into the page's fields; a sampler is typed and committed."""
    for name, value in fields.items():
        if name == "sampler":
            page.locator("#sampler input").fill(value)
            page.locator("#sampler input").press("Enter")
        else:
            page.locator(f"#{name}").locator("textarea, input").first.fill(str(value))
    if "seed" in fields:  # typing a seed unticks "random seed"
        sync_api.expect(page.locator("#random-seed input")).not_to_be_checked()


def wait_for_status(page, before: str, timeout=60_000) -> str:
    """The status line once it has changed from `before` to a result."""
    page.wait_for_function("([selector, old]) => { const t = document.querySelector(selector).innerText.trim();"
                           " return t && t !== old && !t.startsWith('queued') }", arg=[STATUS, before],
                           timeout=timeout)
    return page.inner_text(STATUS).strip()


def status_after(page, action, timeout=60_000) -> str:
    """Do `action` (a click), then wait for the status line to change to a result and return it."""
    before = page.inner_text(STATUS)
    action()
    return wait_for_status(page, before, timeout)


def generate(page, timeout=60_000) -> str:
    return status_after(page, lambda: page.click("#generate"), timeout)


def downloaded(page, k: int = 0) -> tuple[str, bytes]:
    """(file name, bytes) of the k-th PNG offered for download."""
    link = page.locator("#downloads a.download-link").nth(k)
    return link.get_attribute("download"), page.context.request.get(link.get_attribute("href")).body()


def pixels(png: bytes | Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("RGB"))


def cli_error(capsys, *args) -> str:
    """The one-line message `latentdiff generate` exits 2 with."""
    capsys.readouterr()
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err.strip().removeprefix("latentdiff generate: error: ")


def test_page_png_is_the_cli_png(page, folders, tmp_path):
    fill(page, prompt="a red circle", negative="green", sampler="euler_a", guidance="2.5", count=2, seed=5)
    assert generate(page).startswith("2 image(s)")
    assert page.locator("#gallery img").count() >= 2
    captions = page.inner_text("#gallery")
    assert "seed 5 · 3 steps · euler_a · guidance 2.5 · 16x16 · negative: green — a red circle" in captions
    assert "seed 6" in captions
    with page.expect_download() as download:
        page.locator("#downloads a.download-link").first.click()
    assert re.fullmatch(r"\d{5}-5-a-red-circle\.png", download.value.suggested_filename)
    download.value.save_as(tmp_path / "page.png")

    assert main(["generate", "a red circle", "--pipeline", folders["tiny"], "--negative", "green", "--sampler",
                 "euler_a", "--cfg", "2.5", "--n", "2", "--seed", "5", "--out", str(tmp_path / "cli")]) == 0
    cli = sorted((tmp_path / "cli").glob("*-5-*.png"))[0]
    assert np.array_equal(pixels(tmp_path / "page.png"), pixels(cli))
    assert read_png_params(tmp_path / "page.png") == read_png_params(cli)  # so --from-png re-renders it


def test_bad_input_gets_the_cli_message(page, folders, capsys):
    tiny = ["--pipeline", folders["tiny"], "a red circle"]
    cases = [
        (dict(prompt="   "), 'the prompt is empty: give a prompt, e.g. "a red circle"'),
        (dict(guidance="nan"), cli_error(capsys, *tiny, "--cfg", "nan")),
        (dict(width=100000, height=100000), cli_error(capsys, *tiny, "--size", "100000x100000")),
        (dict(width=17), cli_error(capsys, *tiny, "--size", "17x16")),
        (dict(sampler="magic"), cli_error(capsys, *tiny, "--sampler", "magic")),
    ]
    assert "finite" in cases[1][1] and "memory" in cases[2][1] and "multiple of" in cases[3][1]
    for changes, message in cases:
        fill(page, **{"prompt": "a red circle", "guidance": "", "width": 16, "height": 16, **changes})
        assert generate(page) == f"error: {message}"
        if "sampler" in changes:
            fill(page, sampler="ddim")


def test_two_visitors_at_once_get_their_seeds_images(browser, server, folders):
    from latentdiff.pipeline import Text2ImagePipeline

    requests = {11: "a red circle", 21: "two blue squares"}
    pages = {seed: open_page(browser, server) for seed in requests}
    for seed, page in pages.items():
        fill(page, prompt=requests[seed], steps=20, seed=seed)
    befores = {seed: page.inner_text(STATUS) for seed, page in pages.items()}
    for page in pages.values():
        page.click("#generate")
    pipe = Text2ImagePipeline.from_pretrained(folders["tiny"])
    for seed, page in pages.items():
        assert wait_for_status(page, befores[seed], timeout=120_000).startswith("1 image(s)")
        name, png = downloaded(page)
        assert f"-{seed}-" in name
        expected = pipe(requests[seed], seed=seed, num_inference_steps=20).images[0]
        assert np.array_equal(pixels(png), np.asarray(expected))
        page.context.close()


def test_progress_and_cancel(page):
    fill(page, prompt="a red circle", steps=900, width=64, height=64)
    page.click("#generate")
    page.wait_for_function("/step \\d+ of 900/.test(document.body.innerText)", timeout=60_000)
    page.click("#cancel")
    sync_api.expect(page.locator(STATUS)).to_have_text(re.compile(r"cancelled at step \d+ of 900"), timeout=60_000)
    fill(page, steps=3, width=16, height=16)  # the pipeline is free again
    assert generate(page).startswith("1 image(s)")


def test_uploads_are_checked_and_inpainting_matches_the_pipeline(page, folders, tmp_path):
    from latentdiff.pipeline import Text2ImagePipeline

    page.click("text=image to image and inpainting")
    upload = page.locator("#image-upload input[type=file]")
    (tmp_path / "notes.png").write_text("not an image")
    assert status_after(page, lambda: upload.set_input_files(tmp_path / "notes.png")) == \
        "error: image: notes.png cannot be read as an image (not a format Pillow reads)"
    Image.new("1", (4100, 4100)).save(tmp_path / "wide.png")  # a few KiB, 16.8 million pixels
    assert "wide.png is 4100x4100 pixels, more than the 16,777,216 this page accepts" in \
        status_after(page, lambda: upload.set_input_files(tmp_path / "wide.png"))
    (tmp_path / "big.png").write_bytes(os.urandom(150_000))  # over --max-upload 100KB: gradio refuses it
    upload.set_input_files(tmp_path / "big.png")
    page.get_by_text("exceed the maximum allowed size").wait_for()

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = Image.new("L", (16, 16))
    mask.paste(255, (0, 8, 16, 16))  # repaint the bottom half
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    upload.set_input_files(tmp_path / "image.png")
    page.locator("#mask-upload input[type=file]").set_input_files(tmp_path / "mask.png")
    page.locator("#mode label", has_text="inpaint").click()
    fill(page, prompt="a green star", seed=3)
    assert generate(page).startswith("1 image(s)")
    _, png = downloaded(page)
    expected = Text2ImagePipeline.from_pretrained(folders["tiny"]).inpaint("a green star", image, mask, seed=3)
    assert np.array_equal(pixels(png), np.asarray(expected.images[0]))
    assert '"mode": "inpaint"' in Image.open(io.BytesIO(png)).text[EDIT_CHUNK]


def test_picker_offers_a_converted_sd_pipeline_and_refuses_mismatched_stages(page, folders, capsys):
    def pick(folder):
        page.locator("#pipeline input").click()
        options = page.locator("ul[role=listbox] li")
        options.first.wait_for()
        offered = [text.strip("✓\n") for text in options.all_inner_texts()]
        assert offered == [folders["tiny"], folders["mismatched"], folders["sd1"]]
        options.nth(offered.index(folder)).click()

    pick(folders["sd1"])
    page.get_by_text("converted from").wait_for()
    assert page.input_value("#sampler input") == "ddim" and page.input_value("#steps input") == "50"
    fill(page, prompt="a red circle", steps=4, seed=0)
    assert generate(page).startswith("1 image(s)")
    assert "seed 0 · 4 steps · ddim" in page.inner_text("#gallery")

    pick(folders["mismatched"])
    message = cli_error(capsys, "a red circle", "--pipeline", folders["mismatched"])
    assert "stages do not match" in message
    page.get_by_text("stages do not match").wait_for()
    assert page.inner_text("#record [data-testid=markdown]").strip() == f"error: {message}"
