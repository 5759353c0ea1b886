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

from collections import defaultdict
from pathlib import Path

import torch

from activations.families import architecture_of, denoiser_of
from common.errors import UsageError

ATTRIBUTION_METHODS = ("direct", "total")


def head_slices_attribution(sae, site_heads: int, first_head: int, num_heads: int) -> torch.Tensor:
    """[m, num_heads]: per-head L2 norm of each decoder direction, for an SAE on a head site."""
    m, width = sae.W_dec.shape
    d = width // site_heads
    out = torch.zeros(m, num_heads)
    out[:, first_head: first_head + site_heads] = sae.W_dec.detach().float().reshape(m, site_heads, d).norm(dim=-1)
    return out


def _harvest_config(store) -> dict:
    """The harvest config of ``store`` (an ActivationStore): what a rerun of its images needs."""
    cfg = store.record().get("config", {})
    if "num_inference_steps" not in cfg:
        raise UsageError(f"store {store.root} records no harvest config (num_inference_steps, guidance_scale): "
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


class _Reruns:
    """What both attribution methods share: the store's harvest config and prompts, the top examples
    to measure per image, the batched reruns of their generations, and the per-feature sums (head
    shares [m, H], rerun pre-activation, stored activation, example count) that become means."""

    def __init__(self, sae, pipe, store_root: str | Path, stats, features, examples: int):
        from activations.sites import head_table, list_sites
        from activations.store import ActivationStore

        store = ActivationStore(store_root)
        self.pipe, self.store = pipe, store
        self.cfg = _harvest_config(store)
        self.block = sae.placement.site or stats.info["site"]
        self.sites = list_sites(pipe)
        self.table = head_table(self.sites)
        self.todo = _examples_by_image(stats, sae.num_latents, features, examples)
        self.prompts = {int(r["image"]): r for r in store.prompts()}
        m = sae.num_latents
        self.share = torch.zeros(m, len(self.table), dtype=torch.float64)
        self.act = torch.zeros(m, dtype=torch.float64)
        self.stored = torch.zeros(m, dtype=torch.float64)
        self.count = torch.zeros(m, dtype=torch.float64)

    def batches(self, batch_size: int, progress: bool, desc: str):
        """Yield the images to rerun, ``batch_size`` at a time, under a progress bar; the stored
        activations of a batch's examples are summed once it is done."""
        from tqdm.auto import tqdm

        from activations.pipeline import set_scheduler

        set_scheduler(self.pipe, self.cfg.get("scheduler"))
        images = sorted(self.todo)
        bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress)
        for lo in range(0, len(images), batch_size):
            batch = images[lo: lo + batch_size]
            yield batch
            for im in batch:
                for (f, _, _, _, a) in self.todo[im]:
                    self.stored[f] += a
            bar.update(len(batch))
        bar.close()

    def generate(self, batch: list[int], *interventions) -> None:
        """Generate the images of ``batch`` again (the store's prompt and seed; the harvest's steps,
        guidance and size) with ``interventions`` attached."""
        from activations.generate import sample
        from activations.hooks import intervene

        prompts = [self.prompts[i] for i in batch]
        cfg = self.cfg
        if (cfg.get("images") or {}).get("kind", "none") != "none":  # a store of real images: read them again
            self._read(batch, prompts, interventions)
            return
        with torch.no_grad(), intervene(self.pipe, *interventions):
            sample(self.pipe, [p["text"] for p in prompts], [int(p["seed"]) for p in prompts],
                   steps=int(cfg["num_inference_steps"]), guidance=float(cfg["guidance_scale"]),
                   height=cfg.get("height"), width=cfg.get("width"), output_type="latent")

    def _read(self, batch: list[int], prompts: list[dict], interventions) -> None:
        """The images of ``batch`` of a real-image store read again as the harvest read them
        (``activations.harvest.read_images``: the store's copies, seeds, steps and schedule)."""
        import numpy as np
        from PIL import Image

        from activations.generate import schedule
        from activations.harvest import read_images
        from activations.hooks import intervene

        header = self.store.site(self.block).manifest
        timesteps = schedule(self.pipe, int(self.cfg["num_inference_steps"]), tuple(header["latent_size"]))
        pixels = []
        for i in batch:
            path = self.store.image_path(i)
            if not path.exists():
                raise UsageError(f"no copy of image {i} in {path.parent}: rerunning a real-image store needs its images "
                                 "(harvest with save_images: true)")
            pixels.append(np.asarray(Image.open(path).convert("RGB")))
        with intervene(self.pipe, *interventions):
            read_images(self.pipe, pixels, prompts, list(header["steps"]), timesteps, float(self.cfg["guidance_scale"]))

    def result(self) -> dict:
        c = self.count.clamp(min=1)
        return {"attribution": (self.share / c[:, None]).float(), "activation": (self.act / c).float(),
                "store_activation": (self.stored / c).float(), "examples": self.count.float(), "head_table": self.table}


def block_head_attribution(sae, pipe, store_root: str | Path, stats, features: list[int] | None = None,
                           examples: int = 8, batch_size: int = 8, progress: bool = True) -> dict:
    """Rerun the top examples of ``features`` (default: all that fired) and attribute them to heads.

    Returns {"attribution": [m, H] float32 (mean share over the examples; 0 for features not
    measured), "activation": [m] mean rerun encoder pre-activation at those examples, "store_activation":
    [m] mean stored activation there, "examples": [m] count, "head_table": [(site, head)]}.
    """
    from activations.edits import Observe

    run = _Reruns(sae, pipe, store_root, stats, features, examples)
    block, todo = run.block, run.todo
    heads = [s for s in run.sites if s.kind == "head" and s.block == block]
    if not heads:
        raise UsageError(f"no cross-attention heads inside {block!r}; block sites with heads: "
                         f"{', '.join(sorted({s.block for s in run.sites if s.kind == 'head'}))}")
    if not architecture_of(pipe).direct_head_write:
        raise UsageError(f"the direct head attribution folds a block's output projection into its heads' writes, which "
                         f"{architecture_of(pipe).name} blocks gate by the timestep; valid methods here: total")
    denoiser = denoiser_of(pipe)
    enc = sae.encoder.weight.detach().float()  # [m, c]
    block_mod = denoiser.get_submodule(block)
    proj = getattr(block_mod, "proj_out", None)
    w_proj = proj.weight.detach().float().reshape(proj.weight.shape[0], -1) if proj is not None else None  # [c, inner]
    # per head site: W_proj · W_o folded once, [heads, c, d]
    folded = {}
    for s in heads:
        w_o = denoiser.get_submodule(s.name).to_out[0].weight.detach().float()  # [inner, heads*d]
        full = w_proj @ w_o if w_proj is not None else w_o
        folded[s.name] = full.reshape(full.shape[0], s.heads, s.head_dim).permute(1, 0, 2)  # [heads, c, d]
    for batch in run.batches(batch_size, progress, f"feature->heads {block}"):

        def examples(call):
            """(batch rows, features, patches) of the top examples at this call, per branch."""
            for code, branch in ((1, "cond"), (0, "uncond")):
                items = [(k, f, n) for k, im in enumerate(batch) for (f, s, n, b, _) in todo[im] if s == call.step and b == code]
                if not items:
                    continue
                k, f, n = (torch.tensor(c) for c in zip(*items))
                yield call.rows(branch)[k], f, n

        def on_heads(call, site=None):
            for rows, f, n in examples(call):
                out = call.out[rows, :, n].float()  # [e, heads, d]
                s = next(x for x in heads if x.name == site)
                vec = torch.einsum("hcd,ehd->ehc", folded[site], out)  # each head's direct write [e, heads, c]
                contrib = torch.einsum("ehc,ec->eh", vec, enc[f]).double()
                run.share.index_put_((f[:, None], s.first_head + torch.arange(s.heads)[None, :]), contrib, accumulate=True)

        def on_block(call):
            for rows, f, n in examples(call):
                pre = sae.pre_acts(call.delta[rows, n].float()).gather(1, f[:, None])[:, 0]  # [e]
                run.act.index_add_(0, f, pre.double())
                run.count.index_add_(0, f, torch.ones(len(f), dtype=torch.float64))

        obs = [Observe(site=s.name, stage="heads", fn=(lambda call, _n=s.name: on_heads(call, _n))) for s in heads]
        obs.append(Observe(site=block, stage="block", fn=on_block))
        run.generate(batch, *obs)
    return run.result()


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
    from activations.edits import Apply, Observe
    from activations.hooks import intervene

    run = _Reruns(sae, pipe, store_root, stats, features, examples)
    block, todo = run.block, run.todo
    heads = [s for s in run.sites if s.kind == "head"]
    denoiser = denoiser_of(pipe)
    for batch in run.batches(batch_size, progress, f"feature->heads (total) {block}"):
        kept: dict[tuple[int, int, int], tuple] = {}  # (image, step, branch code) -> that row's U-Net inputs

        def keep_inputs(call):
            args, kwargs = call.state.inputs
            size = call.delta.shape[0]  # the U-Net call's batch
            for code, branch in ((1, "cond"), (0, "uncond")):
                rows = call.rows(branch)
                if len(rows) != len(batch):
                    continue
                for k, im in enumerate(batch):
                    if any(s == call.step and b == code for (_, s, _, b, _) in todo[im]):
                        kept[(im, call.step, code)] = (_take_rows(args, rows[k: k + 1], size), _take_rows(kwargs, rows[k: k + 1], size))

        run.generate(batch, Observe(site=block, stage="block", fn=keep_inputs))
        for (im, step, code), (args, kwargs) in kept.items():
            leaves: dict[str, torch.Tensor] = {}

            def make_leaf(x, call):
                leaves[call.site] = x.detach().requires_grad_(True)
                return leaves[call.site]

            seen = {}
            taps = [Apply(site=s.name, stage="heads", fn=make_leaf) for s in heads]
            taps.append(Observe(site=block, stage="block", fn=lambda call: seen.update(delta=call.delta)))
            with torch.enable_grad(), intervene(denoiser, *taps):  # the denoiser alone: one batch row, no guidance halves
                denoiser(*args, **kwargs)
                names = list(leaves)
                for (f, s, n, b, _) in todo[im]:
                    if s != step or b != code:
                        continue
                    pre = sae.pre_acts(seen["delta"][0, n][None].float())[0, f]
                    grads = torch.autograd.grad(pre, [leaves[x] for x in names], retain_graph=True, allow_unused=True)
                    for name, g in zip(names, grads):
                        if g is None:  # a head after the block
                            continue
                        site = next(x for x in heads if x.name == name)
                        contrib = (g * leaves[name]).sum(dim=(0, 2, 3)).detach().double()  # [heads]
                        run.share[f, site.first_head: site.first_head + site.heads] += contrib
                    run.act[f] += float(pre.detach())
                    run.count[f] += 1
    return run.result()


def feature_head_attribution(sae, pipe, store_root, stats, method: str = "direct", **kwargs) -> dict:
    """Block-site SAE: ``block_head_attribution`` (method "direct": the block's own heads' direct
    write) or ``total_head_attribution`` ("total": every head's total effect, by attribution
    patching); head-site SAE: decoder slices. Same dict keys (``attribution`` [m, H] in the global
    head order, ``head_table``)."""
    if method not in ATTRIBUTION_METHODS:
        raise UsageError(f"unknown head attribution method {method!r}; valid: {', '.join(ATTRIBUTION_METHODS)}")
    from activations.sites import head_table, list_sites

    if sae.placement.stage == "heads":
        sites = list_sites(pipe)
        site = next((s for s in sites if s.name == sae.placement.site and s.kind == "head"), None)
        if site is None:
            raise UsageError(f"SAE site {sae.placement.site!r} is not a head site of this model")
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
