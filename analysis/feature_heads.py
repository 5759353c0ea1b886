"""Feature -> heads: how much each cross-attention head writes an SAE feature.

Block-site SAE (placement.stage "block"): the block's value is its Δ (output - input of the
Transformer2DModel), the sum of the attn1, attn2, ff paths through ``proj_out`` (plus biases and
what the norms mix in). Head h of an attn2 module inside the block writes, at position p, the
direct-path vector
    v_h(p) = W_proj_out · W_o[:, h*d:(h+1)*d] · out_h(p)          (biases left out)
and its share of feature f is the projection of that vector on f's encoder direction,
    a_f,h = < v_h(p), W_enc[f] >,
averaged over f's top activations (image, step, i, j, branch) of the store. We rerun those
generations (the store's prompt and seed per image; steps, guidance and scheduler from the store's
harvest config) with ``Observe`` interventions at stage "heads" on each attn2 site of the block and
at stage "block" on the block itself (the feature's encoder pre-activation there, recorded as a
check that the rerun reproduces the harvest). The shares need not sum to the activation: the
self-attention, feed-forward and residual paths, the encoder bias and b_dec, the TopK
nonlinearity and the indirect paths (a head's output read by ff) are not attributed.

``total_head_attribution`` (method "total") measures instead every head's total effect on the
feature's pre-activation by attribution patching (gradient times output at the example's step),
so that heads of earlier blocks, and the block's own heads through its feed-forward, count too.

Head-site SAE (stage "heads", width = heads * head_dim): each head's share is the L2 norm of the
decoder direction's slice for that head.

The result is a [features, heads] matrix in the GLOBAL head order (``activations.sites.head_table``);
heads outside the SAE's block are 0.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

ATTRIBUTION_METHODS = ("direct", "total")


def head_slices_attribution(sae, site_heads: int, first_head: int, num_heads: int) -> torch.Tensor:
    """[m, num_heads]: per-head L2 norm of each decoder direction, for an SAE on a head site."""
    m, width = sae.W_dec.shape
    d = width // site_heads
    out = torch.zeros(m, num_heads)
    out[:, first_head: first_head + site_heads] = sae.W_dec.detach().float().reshape(m, site_heads, d).norm(dim=-1)
    return out


def _harvest_config(store_root: Path) -> dict:
    cfg = json.loads((store_root / "store.json").read_text()).get("config", {})
    if "num_inference_steps" not in cfg:
        raise ValueError(f"{store_root / 'store.json'} records no harvest config (num_inference_steps, guidance_scale): "
                         "a synthetic store cannot be rerun")
    return cfg


def _examples_by_image(stats, m: int, features, examples: int) -> dict[int, list]:
    """The examples to measure: image -> [(feature, step, position index, branch code, stored activation)]."""
    features = [f for f in (range(m) if features is None else features) if int(stats.top_row[f, 0]) >= 0]
    _, w = stats.grid
    todo: dict[int, list] = defaultdict(list)
    for f in features:
        for ex in stats.top_examples(f, examples):
            todo[ex["image"]].append((f, ex["step"], ex["i"] * w + ex["j"], ex["branch"], ex["activation"]))
    return todo


class _Shares:
    """Per-feature sums over the measured examples: head shares [m, H], rerun pre-activation, stored
    activation, and the example count that turns them into means."""

    def __init__(self, m: int, num_heads: int):
        self.share = torch.zeros(m, num_heads, dtype=torch.float64)
        self.act = torch.zeros(m, dtype=torch.float64)
        self.stored = torch.zeros(m, dtype=torch.float64)
        self.count = torch.zeros(m, dtype=torch.float64)

    def add_stored(self, todo: dict[int, list], batch: list[int]) -> None:
        for im in batch:
            for (f, _, _, _, a) in todo[im]:
                self.stored[f] += a

    def result(self, table) -> dict:
        c = self.count.clamp(min=1)
        return {"attribution": (self.share / c[:, None]).float(), "activation": (self.act / c).float(),
                "store_activation": (self.stored / c).float(), "examples": self.count.float(), "head_table": table}


def _rerun(pipe, cfg: dict, prompts: list[dict], *interventions) -> None:
    """Generate the store's images of ``prompts`` again (prompt, seed; the harvest's steps, guidance
    and size) with ``interventions`` attached."""
    from activations.generate import sample
    from activations.hooks import intervene

    with torch.no_grad(), intervene(pipe, *interventions):
        sample(pipe, [p["text"] for p in prompts], [int(p["seed"]) for p in prompts],
               steps=int(cfg["num_inference_steps"]), guidance=float(cfg["guidance_scale"]),
               height=cfg.get("height"), width=cfg.get("width"), output_type="latent")


def block_head_attribution(sae, pipe, store_root: str | Path, stats, features: list[int] | None = None,
                           examples: int = 8, batch_size: int = 8, progress: bool = True) -> dict:
    """Rerun the top examples of ``features`` (default: all that fired) and attribute them to heads.

    Returns {"attribution": [m, H] float32 (mean share over the examples; 0 for features not
    measured), "activation": [m] mean rerun encoder pre-activation at those examples, "store_activation":
    [m] mean stored activation there, "examples": [m] count, "head_table": [(site, head)]}.
    """
    from tqdm.auto import tqdm

    from activations.edits import Observe
    from activations.harvest import set_scheduler
    from activations.sites import head_table, list_sites

    store_root = Path(store_root)
    cfg = _harvest_config(store_root)
    block = sae.placement.site or stats.info["site"]
    sites = list_sites(pipe.unet)
    table = head_table(sites)
    heads = [s for s in sites if s.kind == "head" and s.block == block]
    if not heads:
        raise ValueError(f"no cross-attention heads inside {block!r}; block sites with heads: "
                         f"{', '.join(sorted({s.block for s in sites if s.kind == 'head'}))}")
    m = sae.num_latents
    todo = _examples_by_image(stats, m, features, examples)
    from activations.store import ActivationStore

    prompts = {int(r["image"]): r for r in ActivationStore(store_root).prompts()}
    enc = sae.encoder.weight.detach().float()  # [m, c]
    block_mod = pipe.unet.get_submodule(block)
    proj = getattr(block_mod, "proj_out", None)
    w_proj = proj.weight.detach().float().reshape(proj.weight.shape[0], -1) if proj is not None else None  # [c, inner]
    # per head site: W_proj · W_o folded once, [heads, c, d]
    folded = {}
    for s in heads:
        w_o = pipe.unet.get_submodule(s.name).to_out[0].weight.detach().float()  # [inner, heads*d]
        full = w_proj @ w_o if w_proj is not None else w_o
        folded[s.name] = full.reshape(full.shape[0], s.heads, s.head_dim).permute(1, 0, 2)  # [heads, c, d]
    acc = _Shares(m, len(table))
    set_scheduler(pipe, cfg.get("scheduler"))
    images = sorted(todo)
    bar = tqdm(total=len(images), desc=f"feature->heads {block}", unit="img", disable=not progress)
    for lo in range(0, len(images), batch_size):
        batch = images[lo: lo + batch_size]

        def examples(call):
            """(batch rows, features, patches) of the top examples at this call, per branch."""
            for code, branch in ((1, "cond"), (0, "uncond")):
                rows = call.rows(branch)
                items = [(k, f, n) for k, im in enumerate(batch) for (f, s, n, b, _) in todo[im] if s == call.step and b == code]
                if rows is None or not items:
                    continue
                k, f, n = (torch.tensor(c) for c in zip(*items))
                yield torch.as_tensor(rows).reshape(-1)[k], f, n

        def on_heads(call, site=None):
            for rows, f, n in examples(call):
                out = call.out[rows, :, n].float()  # [e, heads, d]
                s = next(x for x in heads if x.name == site)
                vec = torch.einsum("hcd,ehd->ehc", folded[site], out)  # each head's direct write [e, heads, c]
                contrib = torch.einsum("ehc,ec->eh", vec, enc[f]).double()
                acc.share.index_put_((f[:, None], s.first_head + torch.arange(s.heads)[None, :]), contrib, accumulate=True)

        def on_block(call):
            for rows, f, n in examples(call):
                x = call.delta[rows, n].float()  # [e, c]
                pre = torch.einsum("ec,ec->e", x - sae.b_dec.detach().float(), enc[f]) + sae.encoder.bias.detach().float()[f]
                acc.act.index_add_(0, f, pre.double())
                acc.count.index_add_(0, f, torch.ones(len(f), dtype=torch.float64))

        obs = [Observe(site=s.name, stage="heads", fn=(lambda call, _n=s.name: on_heads(call, _n))) for s in heads]
        obs.append(Observe(site=block, stage="block", fn=on_block))
        _rerun(pipe, cfg, [prompts[i] for i in batch], *obs)
        acc.add_stored(todo, batch)
        bar.update(len(batch))
    bar.close()
    return acc.result(table)


def _take_rows(obj, rows: torch.Tensor, batch: int):
    """``obj`` (U-Net call arguments: tensors, dicts, tuples) with every batch-sized tensor cut to ``rows``."""
    if torch.is_tensor(obj):
        return obj[rows].detach() if obj.ndim and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: _take_rows(v, rows, batch) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take_rows(v, rows, batch) for v in obj)
    return obj


def total_head_attribution(sae, pipe, store_root: str | Path, stats, features: list[int] | None = None,
                           examples: int = 8, batch_size: int = 8, progress: bool = True) -> dict:
    """Each head's total effect on a block-site feature, by attribution patching (Nanda 2023;
    Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery").

    At each top example (image, step, position p, branch) the share of head h is
        a_f,h = sum over positions q and dims d of  ∂pre_f(p) / ∂out_h[q, d] · out_h[q, d],
    the first-order change of f's encoder pre-activation when h's output is scaled from 0 to its
    value: every path from h to the block counts (the block's own heads through its feed-forward
    too, and the heads of every earlier block), where ``block_head_attribution`` counts the direct
    write of the block's own heads only. Heads after the block get 0.

    The generations are rerun as in ``block_head_attribution``; the U-Net inputs of each example's
    step are kept (``RunState.inputs``) and that one U-Net call is run again with gradients, with
    every head's output made a leaf (``Apply`` at stage "heads") and the block's Δ read by
    ``Observe``. Same return keys as ``block_head_attribution``.
    """
    from tqdm.auto import tqdm

    from activations.edits import Apply, Observe
    from activations.harvest import set_scheduler
    from activations.hooks import intervene
    from activations.sites import head_table, list_sites
    from activations.store import ActivationStore

    store_root = Path(store_root)
    cfg = _harvest_config(store_root)
    block = sae.placement.site or stats.info["site"]
    sites = list_sites(pipe.unet)
    table = head_table(sites)
    heads = [s for s in sites if s.kind == "head"]
    m = sae.num_latents
    todo = _examples_by_image(stats, m, features, examples)
    prompts = {int(r["image"]): r for r in ActivationStore(store_root).prompts()}
    enc = sae.encoder.weight.detach().float()
    b_enc, b_dec = sae.encoder.bias.detach().float(), sae.b_dec.detach().float()
    acc = _Shares(m, len(table))
    set_scheduler(pipe, cfg.get("scheduler"))
    images = sorted(todo)
    bar = tqdm(total=len(images), desc=f"feature->heads (total) {block}", unit="img", disable=not progress)
    for lo in range(0, len(images), batch_size):
        batch = images[lo: lo + batch_size]
        kept: dict[tuple[int, int, int], tuple] = {}  # (image, step, branch code) -> that row's U-Net inputs

        def keep_inputs(call):
            args, kwargs = call.state.inputs
            n = call.delta.shape[0]
            for code in (1, 0):
                rows = torch.nonzero(call.codes.reshape(-1) == code).reshape(-1)
                if len(rows) != len(batch):
                    continue
                for k, im in enumerate(batch):
                    if any(s == call.step and b == code for (_, s, _, b, _) in todo[im]):
                        kept[(im, call.step, code)] = (_take_rows(args, rows[k: k + 1], n), _take_rows(kwargs, rows[k: k + 1], n))

        _rerun(pipe, cfg, [prompts[i] for i in batch], Observe(site=block, stage="block", fn=keep_inputs))
        for (im, step, code), (args, kwargs) in kept.items():
            leaves: dict[str, torch.Tensor] = {}

            def make_leaf(x, call):
                leaves[call.site] = x.detach().requires_grad_(True)
                return leaves[call.site]

            seen = {}
            taps = [Apply(site=s.name, stage="heads", fn=make_leaf) for s in heads]
            taps.append(Observe(site=block, stage="block", fn=lambda call: seen.update(delta=call.delta)))
            with torch.enable_grad(), intervene(pipe.unet, *taps):  # the U-Net alone: one batch row, no guidance halves
                pipe.unet(*args, **kwargs)
                names = list(leaves)
                for (f, s, n, b, _) in todo[im]:
                    if s != step or b != code:
                        continue
                    pre = torch.dot(seen["delta"][0, n].float() - b_dec, enc[f]) + b_enc[f]
                    grads = torch.autograd.grad(pre, [leaves[x] for x in names], retain_graph=True, allow_unused=True)
                    for name, g in zip(names, grads):
                        if g is None:  # a head after the block
                            continue
                        site = next(x for x in heads if x.name == name)
                        contrib = (g * leaves[name]).sum(dim=(0, 2, 3)).detach().double()  # [heads]
                        acc.share[f, site.first_head: site.first_head + site.heads] += contrib
                    acc.act[f] += float(pre.detach())
                    acc.count[f] += 1
        acc.add_stored(todo, batch)
        bar.update(len(batch))
    bar.close()
    return acc.result(table)


def feature_head_attribution(sae, pipe, store_root, stats, method: str = "direct", **kwargs) -> dict:
    """Block-site SAE: ``block_head_attribution`` (method "direct": the block's own heads' direct
    write) or ``total_head_attribution`` ("total": every head's total effect, by attribution
    patching); head-site SAE: decoder slices. Same dict keys (``attribution`` [m, H] in the global
    head order, ``head_table``)."""
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown head attribution method {method!r}; valid: {', '.join(ATTRIBUTION_METHODS)}")
    from activations.sites import head_table, list_sites

    if sae.placement.stage == "heads":
        sites = list_sites(pipe.unet)
        site = next((s for s in sites if s.name == sae.placement.site and s.kind == "head"), None)
        if site is None:
            raise ValueError(f"SAE site {sae.placement.site!r} is not a head site of this model")
        table = head_table(sites)
        return {"attribution": head_slices_attribution(sae, site.heads, site.first_head, len(table)), "head_table": table}
    if method == "total":
        return total_head_attribution(sae, pipe, store_root, stats, **kwargs)
    return block_head_attribution(sae, pipe, store_root, stats, **kwargs)


def top_heads(attribution_mh: torch.Tensor, table: list[tuple[str, int]], feature: int, n: int = 3) -> list[tuple[int, str, int, float]]:
    """The ``n`` heads with the largest share of ``feature``: (global head, site, local head, share)."""
    row = attribution_mh[feature]
    order = torch.argsort(row, descending=True)[:n]
    return [(int(h), table[int(h)][0], table[int(h)][1], float(row[h])) for h in order]
