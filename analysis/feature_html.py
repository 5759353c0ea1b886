"""The feature browser as a static HTML folder: opens from disk, no server, no network.

``index.html``: a table of the shown features, sortable by clicking a header (density, mean
activation, top HRV concept, best toy label, AUROC); ``features/<id>.html``: one page per feature
with its top images (heatmaps overlaid), step strip, timestep profile, top heads, HRV concepts and
co-firing features. Inline JS and CSS only; images by relative paths into ``png/``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

CSS = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}
th.sort{cursor:pointer;background:#eee}th.sort:hover{background:#ddd}img{max-width:100%}.num{text-align:right}"""

SORT_JS = """
function sortBy(col, numeric) {
  var body = document.getElementById('rows');
  var rows = Array.prototype.slice.call(body.rows);
  var th = document.getElementById('h' + col);
  var desc = th.getAttribute('data-desc') !== '1';
  th.setAttribute('data-desc', desc ? '1' : '0');
  rows.sort(function (a, b) {
    var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
    if (numeric) { x = parseFloat(x); y = parseFloat(y); if (isNaN(x)) x = -Infinity; if (isNaN(y)) y = -Infinity; }
    var c = x < y ? -1 : (x > y ? 1 : 0);
    return desc ? -c : c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
"""


def _e(x) -> str:
    return html.escape(str(x))


def write_html(report: dict, out: str | Path) -> Path:
    """Write ``out/index.html`` and ``out/features/<id>.html``; returns the index path."""
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    cols = [("feature", False), ("density", True), ("mean activation", True), ("top HRV concept", False),
            ("best label", False), ("AUROC", True), ("top heads", False)]
    head = "".join(f'<th id="h{i}" class="sort" onclick="sortBy({i},{str(num).lower()})">{_e(n)}</th>'
                   for i, (n, num) in enumerate(cols))
    body = []
    for r in report["features"]:
        hrv = (r.get("hrv_concepts") or [{}])[0].get("concept", "")
        truth = r.get("truth") or {}
        auc = truth.get("auroc")
        auc_s = "" if auc is None or auc != auc else f"{auc:.3f}"
        heads = ", ".join(str(h["head"]) for h in r.get("top_heads", []))
        cells = [(r["id"], f'<a href="features/{r["id"]}.html">{r["id"]}</a>'), (r["density"], f'{r["density"]:.4f}'),
                 (r["mean"], f'{r["mean"]:.4f}'), (hrv, _e(hrv)), (truth.get("label", ""), _e(truth.get("label", ""))),
                 (auc_s or "nan", auc_s), (heads, _e(heads))]
        body.append("<tr>" + "".join(f'<td data-v="{_e(v)}">{s}</td>' for v, s in cells) + "</tr>")
        _feature_page(r, report, out)
    pics = "".join(f'<h2>{_e(k.replace("_", " "))}</h2><img src="{_e(v)}" alt="{_e(k)}">' for k, v in report.get("pictures", {}).items())
    index = (f'<!doctype html><html><head><meta charset="utf-8"><title>features of {_e(report["site"])}</title>'
             f'<style>{CSS}</style><script>{SORT_JS}</script></head><body>'
             f'<h1>SAE features at {_e(report["site"])}</h1><p>SAE {_e(report["sae"])}; store {_e(report["store"])}; '
             f'{report["num_latents"]} latents over {report["rows"]} rows; {len(report["features"])} shown (densest first). '
             f'Click a header to sort.</p><table><thead><tr>{head}</tr></thead><tbody id="rows">{"".join(body)}</tbody></table>'
             f'{pics}</body></html>')
    path = out / "index.html"
    path.write_text(index)
    (out / "report_data.json").write_text(json.dumps(report, default=float))
    return path


def _feature_page(r: dict, report: dict, out: Path) -> None:
    def img(key):
        return f'<img src="../{_e(r[key])}" alt="{_e(key)}">' if r.get(key) else ""

    heads = "".join(f"<li>head {h['head']} ({_e(h['site'])}, head {h['local']}): share {h['share']:+.3f}</li>" for h in r.get("top_heads", []))
    hrv = "".join(f"<li>{_e(c['concept'])}: {c['score']:.3f}</li>" for c in r.get("hrv_concepts", []))
    truth = r.get("truth") or {}
    tl = f"<p>best toy label: <b>{_e(truth.get('label'))}</b>, AUROC {truth.get('auroc', float('nan')):.3f} ({_e(truth.get('window'))})</p>" if truth else ""
    co = ", ".join(f'<a href="{c}.html">{c}</a>' for c in r.get("cooccurring", []))
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>feature {r["id"]}</title><style>{CSS}</style></head><body>'
            f'<p><a href="../index.html">all features</a></p><h1>feature {r["id"]} at {_e(report["site"])}</h1>'
            f'<p>density {r["density"]:.4f}, mean activation {r["mean"]:.4f}, mean when active {r["mean_active"]:.4f}, max {r["max"]:.4f}</p>'
            f'{tl}<h2>top images</h2>{img("top_png")}<h2>across steps</h2>{img("strip_png")}<h2>timestep profile</h2>{img("tau_png")}'
            f'<h2>top heads</h2><ul>{heads or "<li>not computed</li>"}</ul><h2>HRV concepts</h2><ul>{hrv or "<li>not computed</li>"}</ul>'
            f'<h2>fires with</h2><p>{co or "none"}</p></body></html>')
    (out / "features" / f"{r['id']}.html").write_text(page)
