"""Take docs/explorer.png: the explorer on the bundled toy model in headless Chromium.

    PYTHONPATH=. python docs/explorer_screenshot.py [--steps 15] [--out docs/explorer.png]

Generates an image, selects four heads and the top-left quarter, weakens them by -2 and hovers a
patch, then saves a palette PNG (small enough to commit).
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "docs" / "explorer.png"))
    args = parser.parse_args()

    import uvicorn
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from steering.explorer.server import ExploreConfig, build_explorer, make_app

    explorer = build_explorer(ExploreConfig(model="toy", device="cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(explorer), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1480, "height": 860})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#steps", str(args.steps))
        page.click("#generate")
        page.wait_for_function("document.getElementById('grid').dataset.ready !== undefined", timeout=300_000)
        page.check("input[name=click][value=select]")
        for head in (0, 1, 2, 3):
            page.click(f"#grid canvas[data-head='{head}']")
        box = page.locator("#overlay").bounding_box()
        page.mouse.move(box["x"] + 2, box["y"] + 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=5)
        page.mouse.up()
        page.click("#apply")
        page.wait_for_selector("#after[src]", timeout=300_000)
        page.mouse.move(box["x"] + 40, box["y"] + 40)
        page.wait_for_function("document.getElementById('hover').textContent.includes('top (head, token)')")
        png = page.screenshot(full_page=True)
        browser.close()
    server.should_exit = True
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
