"""``diffatlas analyze features``: the W&B run read back from its offline folder, the static HTML
report opened in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_feature_links import SITE, toy_store  # noqa: F401  (module-scoped fixture)


@pytest.fixture(scope="module")
def report_dir(toy_store, tmp_path_factory, random_toy_pipe):  # noqa: F811
    from activations.store import ActivationStore
    from analysis.cli import finish_features
    from analysis.feature_report import FeaturesConfig, build_report
    from sae.config import SparseCoderConfig
    from sae.registry import get_architecture

    width = ActivationStore(toy_store).site(SITE).width
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=16, k=4), width)
    sae.placement.site, sae.placement.model = SITE, "toy"
    tmp = tmp_path_factory.mktemp("browser")
    sae.save_pretrained(tmp / "sae")
    cfg = FeaturesConfig(sae=str(tmp / "sae"), store=str(toy_store), out=str(tmp / "out"), features=4, examples=1,
                         images=2, progress=False)
    report = build_report(cfg, pipe=random_toy_pipe)
    assert finish_features(cfg, report) == 0
    return Path(cfg.out), report


def test_feature_browser__wandb_run_has_feature_table_and_images(report_dir):
    from analysis.feature_wandb import COLUMNS

    out, report = report_dir
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list((runs[0] / "files" / "media" / "table").glob("features_*.table.json"))
    assert tables, "no features table in the offline run"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == COLUMNS and len(table["data"]) == len(report["features"]) == 4
    assert {row[0] for row in table["data"]} == {r["id"] for r in report["features"]}
    assert report["toy"] and all(r["truth"]["label"] for r in report["features"])
    pngs = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(pngs) >= 3 * 4 and all(p.stat().st_size > 0 for p in pngs)


def test_feature_browser__html_opens_offline_images_load_and_sorting_works(report_dir):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (.ci/run installs it with apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e .[test])")
    out, report = report_dir
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: errors.append(f"network request {r.url}") if not r.url.startswith("file:") else None)
            page.goto((out / "index.html").resolve().as_uri())
            page.wait_for_load_state("load")
            ids = lambda: page.eval_on_selector_all("#rows tr", "rs => rs.map(r => r.cells[0].getAttribute('data-v'))")
            dens = lambda: page.eval_on_selector_all("#rows tr", "rs => rs.map(r => parseFloat(r.cells[1].getAttribute('data-v')))")
            assert len(ids()) == 4
            page.click("#h1")  # density: descending
            assert dens() == sorted(dens(), reverse=True)
            page.click("#h1")  # again: ascending
            assert dens() == sorted(dens())
            page.click("#h0")
            first = ids()
            page.click("#h0")
            assert ids() == list(reversed(first))
            for r in report["features"]:
                page.goto((out / "features" / f"{r['id']}.html").resolve().as_uri())
                page.wait_for_load_state("load")
                widths = page.eval_on_selector_all("img", "is => is.map(i => i.complete ? i.naturalWidth : 0)")
                assert len(widths) >= 3 and min(widths) > 0, f"an image of feature {r['id']} did not load: {widths}"
        finally:
            browser.close()
    assert not errors, errors
