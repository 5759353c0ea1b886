"""``diffatlas explore``: the explorer's web app (FastAPI + one page of plain JavaScript).

Endpoints (JSON; every error is ``{"error": "one line"}`` with status 400 for bad input, 404 for
unknown ids, 500 for a server error, never a traceback; the server keeps serving):

* ``GET  /``                                   the page (``static/explorer.html``)
* ``GET  /api/info``                           model, sites (grid columns), heads, defaults, SAE, HRVs
* ``GET  /api/tokens?prompt=``                 the prompt's tokens (the pipeline's tokenizer)
* ``POST /api/generate``  {prompt, seed, steps, guidance} -> {gen, image (PNG base64), tokens, steps}
* ``GET  /api/grid?gen=&step=&token=``         every head's map for one token at one step (from the cache)
* ``GET  /api/head?gen=&head=[&token=&step=]`` one head's map, or all its maps [steps][tokens][H*W]
* ``GET  /api/patch?gen=&step=&y=&x=[&token=]`` which heads attend from a point to which token
* ``GET  /api/features?gen=&step=&y=&x=``     with an SAE: features active at a point, with heatmaps
                                               (and, with --features, each one's labels)
* ``POST /api/edit``      an ``EditSpec`` -> {edit, image, diff, max_diff, recipe (YAML)}
* ``GET  /api/recipe?gen=&edit=``              an edit's recipe YAML
* ``GET  /api/hrv/top?concept=&n=``            the top n heads of an HRV concept
* ``POST /api/open``      {image (the file's bytes, base64 or a data: URL), name, caption, steps, guidance}
                          -> {name, caption, inversion (folder), steps, guidance, image (PNG base64)}:
                          the image is inverted (``activations.invert``); generations start from its noise
* ``POST /api/close``                          back to seeds
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from importlib import resources

from common.errors import UsageError
from steering.explorer.session import EditSpec, Explorer, png_base64

MAX_UPLOAD = 16 * 2**20  # bytes of an opened image file: far above any image a model here takes


@dataclass
class ExploreConfig:
    model: str = "toy"
    """'toy', a local diffusers folder, or a hub id (read from the local cache)."""
    sae: str | None = None
    """An SAE folder (SAE.from_pretrained) whose features the page can edit."""
    hrv: str | None = None
    """An HRV folder (diffatlas analyze hrv): heads coloured by their top concept, top-n head selection."""
    features: str | None = None
    """A feature analysis folder of the --sae (diffatlas analyze features --out): listed features show their density, top HRV concept and toy ground-truth label."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8765
    """Port to listen on (0: a free one, printed)."""
    device: str | None = None
    """torch device (default: CUDA when available)."""
    keep: int = 8
    """Generations kept in memory with their maps (the oldest is dropped first)."""
    inversions: str = "outputs/explore"
    """Folder where images opened in the page are inverted (one folder each, named by the recipes of their edits)."""


def _error(err: BaseException):
    from fastapi.responses import JSONResponse

    from common.errors import one_line

    if isinstance(err, KeyError):
        return JSONResponse({"error": one_line(err)}, status_code=404)
    if isinstance(err, (ValueError, IndexError, FileNotFoundError, TypeError)):
        return JSONResponse({"error": one_line(err)}, status_code=400)
    return JSONResponse({"error": f"server error: {type(err).__name__}: {one_line(err)}"}, status_code=500)


def _answers(fn):
    """Any exception of ``fn`` becomes a JSON error message (the page shows it; no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - every error is answered, the server keeps serving
            return _error(err)

    return wrapper


def _spec(body: dict) -> EditSpec:
    if not isinstance(body, dict):
        raise UsageError("the edit must be a JSON object")
    names = {f.name for f in dataclasses.fields(EditSpec)}
    unknown = sorted(set(body) - names)
    if unknown:
        raise UsageError(f"unknown edit field(s) {unknown}; valid fields: {', '.join(sorted(names))}")
    if "gen" not in body:
        raise UsageError("the edit needs 'gen', the generation to edit")
    return EditSpec(**body)


def _upload(body: dict) -> bytes:
    """The file bytes of ``POST /api/open``'s ``image``: base64, bare or as a data: URL (what the
    page's FileReader gives)."""
    import base64
    import binascii

    data = body.get("image")
    if not isinstance(data, str) or not data:
        raise UsageError("image must be the image file's bytes in base64 (or a data: URL); choose an image file")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) * 3 // 4 > MAX_UPLOAD:
        raise UsageError(f"the image file is about {len(data) * 3 // 4 / 2**20:.0f} MiB; the explorer opens files up to "
                         f"{MAX_UPLOAD // 2**20} MiB")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise UsageError("image is not base64 data; send the image file's bytes in base64 (or a data: URL)") from None


def page_html() -> str:
    return resources.files("steering.explorer").joinpath("static/explorer.html").read_text(encoding="utf-8")


def make_app(explorer: Explorer):
    """The FastAPI app over one ``Explorer``."""
    from fastapi import Body, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    app = FastAPI(title="diffatlas explorer", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "body"))
        return JSONResponse({"error": f"bad request: {where}: {first.get('msg', 'invalid value')}"}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page_html()

    @app.get("/api/info")
    @_answers
    def info():
        return explorer.info()

    @app.get("/api/tokens")
    @_answers
    def tokens(prompt: str):
        explorer.check_prompt(prompt)
        return {"tokens": explorer.tokens(prompt)}

    @app.post("/api/generate")
    @_answers
    def generate(body: dict = Body(...)):
        unknown = sorted(set(body) - {"prompt", "seed", "steps", "guidance"})
        if unknown:
            raise UsageError(f"unknown field(s) {unknown}; valid fields: prompt, seed, steps, guidance")
        gen = explorer.generate(body.get("prompt", ""), body.get("seed", 0), body.get("steps"), body.get("guidance"))
        return {"gen": gen.id, "image": png_base64(gen.image), "tokens": gen.tokens, "steps": gen.steps,
                "prompt": gen.prompt, "seed": gen.seed, "guidance": gen.guidance, "inversion": gen.inversion}

    @app.post("/api/open")
    @_answers
    def open_image(body: dict = Body(...)):
        fields = ("image", "name", "caption", "steps", "guidance")
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise UsageError(f"unknown field(s) {unknown}; valid fields: {', '.join(fields)}")
        opened = explorer.open_image(_upload(body), body.get("name", "image"), body.get("caption", ""),
                                     body.get("steps"), body.get("guidance"))
        return opened.describe()

    @app.post("/api/close")
    @_answers
    def close_image():
        explorer.close_image()
        return {"opened": None}

    @app.get("/api/grid")
    @_answers
    def grid(gen: str, step: int, token: int):
        return {"heads": explorer.grid(gen, step, token)}

    @app.get("/api/head")
    @_answers
    def head(gen: str, head: int, token: int | None = None, step: int | None = None):
        return explorer.head_maps(gen, head, token, step)

    @app.get("/api/patch")
    @_answers
    def patch(gen: str, step: int, y: float, x: float, token: int | None = None):
        return explorer.patch(gen, step, y, x, token)

    @app.get("/api/features")
    @_answers
    def features(gen: str, step: int, y: float, x: float):
        return explorer.features(gen, step, y, x)

    @app.post("/api/edit")
    @_answers
    def edit(body: dict = Body(...)):
        return explorer.edit(_spec(body))

    @app.get("/api/recipe")
    @_answers
    def recipe(gen: str, edit: str):
        return PlainTextResponse(explorer.recipe(gen, edit), media_type="application/x-yaml")

    @app.get("/api/hrv/top")
    @_answers
    def hrv_top(concept: str, n: int = 5):
        return {"heads": explorer.hrv_top(concept, n)}

    return app


def build_explorer(cfg: ExploreConfig) -> Explorer:
    from activations.pipeline import load_pipeline
    from common.files import out_folder

    sae = hrv = labels = None
    if cfg.features and not cfg.sae:
        raise UsageError(f"--features {cfg.features} labels an SAE's features; give that SAE with --sae DIR")
    if cfg.sae:
        from sae.sparse_coder import SparseCoder

        sae = SparseCoder.from_pretrained(cfg.sae)
    if cfg.features:
        # only the folder given: an analysis found beside the SAE may be of another run of it
        from analysis.feature_report import FeatureLabels

        labels = FeatureLabels.load(cfg.features)
        labels.check_sae(sae)  # before the model loads: a wrong folder fails fast
    out_folder(cfg.inversions, "--inversions")  # a file in its place is refused now, not at the first open
    pipe = load_pipeline(cfg.model, device=cfg.device)
    if cfg.hrv:
        from analysis.hrv import HRV

        hrv = HRV.load(cfg.hrv, pipe=pipe)
    return Explorer(pipe, model=cfg.model, sae=sae, hrv=hrv, keep=cfg.keep, labels=labels, inversions=cfg.inversions)


def main(argv: list[str] | None = None) -> int:
    from common.config import check_counts, parse

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise UsageError(f"the explorer needs FastAPI and uvicorn ({err}); install them with: pip install 'diffatlas[explore]'") from None

    cfg = parse(ExploreConfig, argv, "diffatlas explore", __doc__.split("\n\n")[0])
    if isinstance(cfg.port, bool) or not 0 <= cfg.port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (0: a free port), got {cfg.port}")
    check_counts(cfg, "diffatlas explore", positive=("keep",))
    sock = listen(cfg.host, cfg.port)  # a port in use is refused before anything loads or is printed
    try:
        explorer = build_explorer(cfg)  # bad input raises; the dispatcher prints it as one line
        app = make_app(explorer)
        port = sock.getsockname()[1]
        print(f"diffatlas explorer: http://{cfg.host}:{port}/  (model {cfg.model}; Ctrl-C stops it)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def listen(host: str, port: int):
    """A socket bound to (host, port) for uvicorn; a port in use or an address this machine lacks
    is one line naming it."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UsageError(f"--host {host!r} is not an address of this machine ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another with --port "
                         f"(0: a free one)") from None
    return sock
