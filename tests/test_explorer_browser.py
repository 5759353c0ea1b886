"""The explorer's page in a real browser: headless Chromium (the system's package) driven by
Playwright against a uvicorn server in a thread (the toy architecture, random weights, 2 steps)."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system chromium on PATH (.ci/run installs it: apt-get install -y chromium)")

PROMPT = "a red circle in the top left on a blue background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(explorer):
    from steering.explorer.server import make_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(explorer), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", explorer
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(random_toy_pipe):
    from steering.explorer.session import Explorer

    yield from serve(Explorer(random_toy_pipe, model="toy"))


@pytest.fixture(scope="module")
def sae_server(random_toy_pipe, feature_analysis):
    """An SAE with its feature analysis (``diffatlas explore --sae DIR --features DIR``)."""
    from analysis.feature_report import FeatureLabels
    from sae.sparse_coder import SparseCoder
    from steering.explorer.session import Explorer

    sae_dir, out, report = feature_analysis
    explorer = Explorer(random_toy_pipe, model="toy", sae=SparseCoder.from_pretrained(sae_dir), labels=FeatureLabels.load(out))
    for url, _ in serve(explorer):
        yield url, report


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def shown(page, selector) -> np.ndarray:
    from PIL import Image

    src = page.get_attribute(selector, "src")
    assert src and src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def generate(page, steps=2, seed=4):
    page.fill("#prompt", PROMPT)
    page.fill("#seed", str(seed))
    page.fill("#steps", str(steps))
    page.fill("#guidance", "4")
    page.click("#generate")
    page.wait_for_function("document.getElementById('grid').dataset.ready !== undefined")


def test_browser__generate_select_scale_shows_the_python_api_image(server, browser):
    from activations.edits import HeadEdit
    from activations.generate import sample
    from activations.hooks import intervene
    from activations.masks import Patches

    url, explorer = server
    page, errors = open_page(browser, url)
    generate(page)
    before = shown(page, "#image")
    assert page.locator("#grid canvas").count() == 52
    # heads 0 and 2 of the first (16x16) site, clicked in the grid
    page.check("input[name=click][value=select]")
    page.click("#grid canvas[data-head='0']")
    page.click("#grid canvas[data-head='2']")
    assert page.inner_text("#nheads") == "2"
    # a box over the top-left quarter of the image
    box = page.locator("#overlay").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 - 2, box["y"] + box["height"] / 2 - 2, steps=5)
    page.mouse.up()
    patches = sorted(page.evaluate("[...S.sel]"))
    assert patches == [i * 16 + j for i in range(8) for j in range(8)]
    page.fill("#factor", "-2")
    page.click("#apply")
    page.wait_for_selector("#after[src]")
    after = shown(page, "#after")
    assert not np.array_equal(after, before)
    assert shown(page, "#diff").max() > 0

    site = explorer.sites[0].name
    words = list(range(1, 12))  # the prompt's words (start and end tokens untouched)
    edit = HeadEdit(site=site, stage="probs", heads=[0, 2], tokens=words, scale=-2.0, mask=Patches(patches, grid=(16, 16)))
    with intervene(explorer.pipe, edit):
        expected = np.asarray(sample(explorer.pipe, [PROMPT], [4], steps=2, guidance=4.0).images[0].convert("RGB"))
    assert np.array_equal(after, expected)
    assert "kind: head_edit" in page.inner_text("#recipe")
    # hovering a patch names heads and tokens; a click opens a head large
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.wait_for_function("document.getElementById('hover').textContent.includes('top (head, token)')")
    page.check("input[name=click][value=open]")
    page.click("#grid canvas[data-head='1']")
    page.wait_for_selector("#large table")
    assert page.locator("#large canvas").count() == 2 * 13
    assert errors == []
    page.close()


def test_browser__bad_input_shows_a_message_and_the_page_keeps_working(server, browser):
    url, _ = server
    page, errors = open_page(browser, url)
    page.fill("#prompt", "a purple unicorn")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_selector("#error:visible")
    assert "vocabulary: 'unicorn'" in page.inner_text("#error") and "Traceback" not in page.inner_text("#error")
    generate(page)
    assert not page.is_visible("#error")
    page.click("#apply")  # no heads, no patches
    page.wait_for_selector("#error:visible")
    assert "no patches selected" in page.inner_text("#error")
    # only the browser's own notes of the two refused requests (status 400), no script error
    assert all("status of 400" in e for e in errors), errors
    page.close()


def test_browser__hover_outlines_only_heads_above_uniform_and_says_when_there_are_none(server, browser):
    url, explorer = server
    page, errors = open_page(browser, url)
    generate(page)
    gen, step, token = page.evaluate("[S.gen, S.step, S.token]")
    g = explorer.get(gen)
    for m in g.maps.values():  # every head uniform everywhere, but head 5 from the top-left patch to the token
        m.fill_(1 / g.keys)
    site = explorer.sites[1]
    assert site.first_head == 4
    g.maps[site.name][step, 1, 0, token] = 0.5
    box = page.locator("#overlay").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.wait_for_function("document.getElementById('hover').textContent.includes('patch (0, 0)')")
    assert page.eval_on_selector_all("#grid canvas.hot", "cs => cs.map(c => c.dataset.head)") == ["5"]
    assert "heads attending most to" in page.inner_text("#hover")
    page.mouse.move(box["x"] + box["width"] - 3, box["y"] + box["height"] - 3)
    page.wait_for_function("document.getElementById('hover').textContent.includes('patch (15, 15)')")
    assert page.locator("#grid canvas.hot").count() == 0
    text = page.inner_text("#hover")
    assert "no head attends to" in text and "above 0.050 (uniform: 0.025)" in text and "top (head, token): none above" in text
    assert errors == []
    page.close()


def test_browser__features_show_their_analysis_labels_and_a_bad_feature_edit_is_a_message(sae_server, browser):
    import re

    url, report = sae_server
    rows = {r["id"]: r for r in report["features"]}
    page, errors = open_page(browser, url)
    generate(page)
    page.check("#feat-mode")
    box = page.locator("#overlay").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function("document.getElementById('features').textContent.includes('SAE features at')")
    lines = page.eval_on_selector_all("#features div", "ds => ds.map(d => d.textContent)")
    assert lines
    for line in lines:
        row = rows[int(re.search(r"#(\d+):", line).group(1))]
        assert f"{100 * row['density']:.1f}% of tokens overall" in line
        assert f"HRV concept {row['hrv_concepts'][0]['concept']} ({row['hrv_concepts'][0]['score']:.3f})" in line
        assert f"ground truth {row['truth']['label']} (AUROC {row['truth']['auroc']:.2f})" in line
    # an SAE edit of a feature the SAE lacks: a message in the page, then the page keeps working
    page.uncheck("#feat-mode")
    page.select_option("#op", "sae")
    page.check("#all-patches")
    page.fill("#feature", "16")
    page.click("#apply")
    page.wait_for_selector("#error:visible")
    assert "feature 16 out of range for this SAE with 16 latents (valid: 0..15)" in page.inner_text("#error")
    page.fill("#feature", "3")
    page.select_option("#sae-mode", "ablate")
    page.click("#apply")
    page.wait_for_selector("#after[src]")
    assert not page.is_visible("#error")
    assert all("status of 400" in e for e in errors), errors
    page.close()


def test_browser__a_step_range_is_sent_as_every_step_and_the_steps_limit_is_shown(server, browser):
    url, explorer = server
    page, errors = open_page(browser, url)
    assert page.inner_text("#steps-limit") == "(1-100)" and page.get_attribute("#steps", "max") == "100"
    generate(page, steps=3)
    page.select_option("#when", "range")
    page.fill("#from", "1")
    page.fill("#to", "2")
    assert page.evaluate("editSpec().when") == {"steps": [1, 2]}  # an activations.timesteps gate: the steps listed
    assert errors == []
    page.close()


def test_browser__open_an_image_draws_it_from_its_inverted_noise_then_back_to_seeds(random_toy_pipe, browser, tmp_path):
    """A text file is refused with a message; then choose an image and a caption, open it: the page
    shows the image and draws it again from its inversion (the server's Inversion.sample, bit for
    bit), with steps and guidance fixed to it; back to seeds undoes it."""
    from PIL import Image

    from steering.explorer.session import Explorer

    explorer = Explorer(random_toy_pipe, model="toy", inversions=tmp_path / "inv")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("not an image")
    for url, _ in serve(explorer):
        page, errors = open_page(browser, url)
        page.fill("#steps", "2")
        page.fill("#guidance", "1")
        page.set_input_files("#image-file", str(tmp_path / "notes.txt"))
        page.click("#open-image")
        page.wait_for_selector("#error:visible")
        assert "cannot read image notes.txt: not an image file" in page.inner_text("#error")
        assert explorer.opened is None and not page.is_visible("#opened")
        page.set_input_files("#image-file", str(tmp_path / "photo.png"))
        page.fill("#caption", PROMPT)
        page.click("#open-image")
        page.wait_for_function("document.getElementById('status').textContent.includes('from the opened image')")
        assert np.array_equal(shown(page, "#opened-image"), pixels)
        assert page.is_visible("#opened") and "photo.png" in page.inner_text("#opened")
        assert page.input_value("#prompt") == PROMPT and page.is_disabled("#steps") and page.is_disabled("#seed")
        opened = explorer.opened
        assert opened.inversion.steps == 2 and opened.inversion.guidance == 1.0
        expected = np.asarray(opened.inversion.sample(explorer.pipe, [PROMPT]).images[0].convert("RGB"))
        assert np.array_equal(shown(page, "#image"), expected)
        page.click("#to-seeds")
        page.wait_for_selector("#opened", state="hidden")
        assert explorer.opened is None and not page.is_disabled("#steps") and not page.is_visible("#error")
        assert all("status of 400" in e for e in errors) and len(errors) == 1, errors  # the refused text file
        page.close()
