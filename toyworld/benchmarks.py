"""What the science benchmarks (``benchmarks/``) need to know per bundled model, declared once.

``python benchmarks/<name>.py --model toy-mmdit`` runs a benchmark on the toy MMDiT; a site option
left out (``--site``, ``--sites``) takes the model's entry in ``SITES`` here, so no benchmark names a
U-Net or MMDiT site itself. The toy MMDiT's sites sit at about the depth of the toy U-Net's: its
6 joint blocks have one 8 x 8 token grid, so ``block`` (the U-Net's 8 x 8 decoder block
``up_blocks.2.attentions.0``, two thirds down the 13 attention blocks) is the fifth block of six,
and composition's three sites (an early, a late and the deepest decoder block of the U-Net) are
the second, fourth and fifth. Any site a user gives wins, and one the model lacks is refused in one
line naming the model's image block sites.

The benchmarks import this module from the installed ``toyworld`` package (they never edit
``sys.path``); it stands on ``activations`` only.
"""

from __future__ import annotations

from pathlib import Path

SITES: dict[str, dict] = {
    "toy": {"block": "up_blocks.2.attentions.0",
            "blocks": ["down_blocks.1.attentions.0", "up_blocks.2.attentions.0", "up_blocks.3.attentions.0"]},
    "toy-mmdit": {"block": "transformer_blocks.4",
                  "blocks": ["transformer_blocks.1", "transformer_blocks.3", "transformer_blocks.4"]},
}
"""Per bundled model: ``block``, the one block site of the single-site benchmarks (concept_recovery,
sae_quality, steering_eval, unlearning); ``blocks``, composition's sites."""


def _fail(prog: str | None, message: str):
    raise SystemExit(f"{prog}: error: {message}" if prog else message)


def default_sites(model: str, key: str = "block", prog: str | None = None, flag: str = "--site"):
    """The benchmark site(s) ``key`` of a bundled ``model`` (``SITES``); another model has none
    declared: a SystemExit in one line asking for ``flag``."""
    if model not in SITES:
        _fail(prog, f"no default benchmark sites for model {model!r} (declared for {', '.join(SITES)} in "
                    f"toyworld/benchmarks.py); give {flag}")
    value = SITES[model][key]
    return list(value) if isinstance(value, list) else value


def denoiser(model: str):
    """``model``'s denoiser, weights not needed (random for a registered model: cheap, for names)."""
    from activations.sites import denoiser_for

    return denoiser_for(model)


def image_block_sites(model) -> list[str]:
    """Block sites on the image token grid (not an MMDiT's ``.context`` text-stream sites), in
    forward order, of a model name, a pipeline or a denoiser."""
    from activations.sites import list_sites

    sites = list_sites(denoiser(model) if isinstance(model, str) else model)
    return [s.name for s in sites if s.kind == "block" and s.resolution[0] > 1]


def check_sites(model: str, sites, prog: str | None = None, flag: str = "--site", blocks: list[str] | None = None) -> None:
    """A SystemExit in one line if a site of ``sites`` is not an image block site of ``model``,
    naming the valid ones; before any work (the model's denoiser is built without its weights)."""
    blocks = image_block_sites(model) if blocks is None else blocks
    for site in [sites] if isinstance(sites, str) else sites:
        if site not in blocks:
            _fail(prog, f"{flag}: {site!r} is not a block site of model {model!r}; valid: {', '.join(blocks)}")


def direct_attribution(model: str) -> bool:
    """Whether ``model``'s heads write into their block through fixed weights, so that the feature
    attribution method ``direct`` applies (U-Nets; not MMDiTs, whose AdaLN gates the writes)."""
    from activations.families import architecture_of

    return bool(architecture_of(denoiser(model)).direct_head_write)


def run_record(script: str, args) -> dict:
    """The settings a benchmark claims its ``--out`` folder with (``common.files.claim_folder``):
    ``model`` is left out for the default ``toy``, so that a folder of a run from before ``--model``
    existed is still the same run (a rerun resumes it)."""
    return {"benchmark": Path(script).stem, **{k: v for k, v in vars(args).items() if not (k == "model" and v == "toy")}}
