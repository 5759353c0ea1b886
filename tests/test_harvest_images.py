"""Harvesting real images: encode -> noise -> one denoiser call per timestep, rows equal to a
computation written out here; records with the image's hash and noise seed; resume; toy renders
with their truth; bad input named in one line before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from activations.config import HarvestConfig, ImageSource, PromptSource
from activations.harvest import harvest
from activations.models import build_tiny_pipeline
from activations.store import ActivationStore
from activations.text import encode_prompts
from common.errors import UsageError

SITES = {"sd1": ("down_blocks.1.attentions.0", "down_blocks.1.attentions.0.transformer_blocks.0.attn2"),
         "sd3": ("transformer_blocks.1", "transformer_blocks.1.attn")}
CAPTIONS = {"a.png": "a red cat", "b.png": "a blue dog"}


def image_folder(tmp_path, size=16):
    folder = tmp_path / "images_in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in CAPTIONS:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"file": f, "text": t}) + "\n" for f, t in CAPTIONS.items()))
    return folder


def config(tmp_path, family, **kw) -> HarvestConfig:
    folder = tmp_path / "images_in"
    base = dict(model=f"tiny-{family}", out=str(tmp_path / "store"), sites=list(SITES[family]),
                images=ImageSource(kind="folder", path=str(folder), captions=str(tmp_path / "captions.jsonl")),
                num_inference_steps=4, guidance_scale=4.0, timesteps={"steps": [0, 2]}, branch="cond", seed=7,
                batch_size=2, images_per_shard=1, progress=False)
    base.update(kw)
    return HarvestConfig(**base)


def by_hand(pipe, family, pixels_u8, caption, seed, t, block):
    """The block's Δ for one image at timestep t, written out: VAE mean, the family's noising by
    formula, one denoiser call, a forward hook on the block."""
    x = torch.from_numpy(np.array(pixels_u8)).permute(2, 0, 1)[None].float() / 127.5 - 1
    vae = pipe.vae
    x0 = (vae.encode(x).latent_dist.mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    noise = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed))[None]
    seen = {}
    if family == "sd1":
        a = pipe.scheduler.alphas_cumprod[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        module = pipe.unet.get_submodule(block)
        h = module.register_forward_hook(lambda m, args, out: seen.update(d=out[0] - args[0]))
        pipe.unet(x_t, torch.tensor([t]), encoder_hidden_states=encode_prompts(pipe, [caption]))
        h.remove()
        return seen["d"].flatten(2).transpose(1, 2)[0]  # [H*W, C]
    sigma = t / 1000
    x_t = (1 - sigma) * x0 + sigma * noise
    embeds, _, pooled, _ = encode_prompts(pipe, [caption], full=True)
    module = pipe.transformer.get_submodule(block)
    h = module.register_forward_hook(lambda m, args, kwargs, out: seen.update(d=out[1] - kwargs["hidden_states"]), with_kwargs=True)
    pipe.transformer(hidden_states=x_t, timestep=torch.tensor([float(t)]), encoder_hidden_states=embeds, pooled_projections=pooled)
    h.remove()
    return seen["d"][0]


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_rows_of_a_real_image_equal_encode_noise_denoise_written_out(tmp_path, family):
    from activations.generate import schedule

    pipe = build_tiny_pipeline(family)
    folder = image_folder(tmp_path)
    cfg = config(tmp_path, family)
    summary = harvest(cfg, pipe=pipe)
    assert summary["images"] == 2
    store = ActivationStore(cfg.out, verify=True)
    block, head = SITES[family]
    timesteps = schedule(pipe, 4)
    with torch.no_grad():
        for image, name in enumerate(CAPTIONS):
            pixels = np.asarray(Image.open(folder / name).convert("RGB"))
            for step in (0, 2):
                expected = by_hand(pipe, family, pixels, CAPTIONS[name], cfg.seed + image, timesteps[step], block)
                got = store.site(block).feature_map(image=image, step=step).float()
                torch.testing.assert_close(got.flatten(0, 1), expected.float(), atol=3e-3, rtol=1e-2)
    records = store.prompts()
    assert [r["text"] for r in records] == list(CAPTIONS.values()) and [r["seed"] for r in records] == [7, 8]
    assert all(len(r["sha256"]) == 16 for r in records) and records[0]["sha256"] != records[1]["sha256"]
    meta = store.site(head).read(np.arange(store.site(head).num_rows))[1]
    assert sorted(set(meta["step"].tolist())) == [0, 2] and set(meta["branch"].tolist()) == {1}
    assert store.site(head).manifest["config"]["images"]["kind"] == "folder"
    assert (tmp_path / "store" / "images" / "0.png").exists()
    again = harvest(cfg, pipe=pipe)  # resumes: nothing is read twice
    assert again["shards"] == 0 and again["skipped"] == 2


def test_toy_renders_are_read_with_their_prompts_and_truth(tmp_path, random_toy_pipe):
    cfg = HarvestConfig(model="toy", out=str(tmp_path / "r"), sites=["mid_block.attentions.0"],
                        prompts=PromptSource(kind="toyworld", num_prompts=2), images=ImageSource(kind="renders"),
                        num_inference_steps=3, timesteps="early", guidance_scale=4.0, batch_size=2, images_per_shard=2,
                        progress=False)
    harvest(cfg, pipe=random_toy_pipe)
    store = ActivationStore(cfg.out)
    truth = json.loads((tmp_path / "r" / "images" / "0.json").read_text())
    assert "objects" in truth["scene"] and truth["text"] == store.prompts()[0]["text"]
    saved = np.asarray(Image.open(tmp_path / "r" / "images" / "0.png"))
    assert (saved == np.asarray(Image.open(tmp_path / "r" / "images" / "0.truth.png"))).all()  # the render itself was read


@pytest.mark.parametrize("case, message", [
    ("garbage", "cannot read image .*b.png"),
    ("empty", "holds no images; valid image files: .png"),
    ("size", "image .*a.png is 16 x 16 pixels; this run takes 24 x 24"),
    ("caption", "no caption for b.png"),
    ("branch", "valid branches: cond"),
    ("count", r"images.num_images=5 but the folder source holds only 2 images"),
])
def test_bad_input_is_one_line_naming_it_and_nothing_is_written(tmp_path, case, message):
    pipe = build_tiny_pipeline("sd1")
    folder = image_folder(tmp_path)
    kw = {}
    if case == "garbage":
        (folder / "b.png").write_bytes(b"not an image")
    elif case == "empty":
        for p in folder.iterdir():
            p.unlink()
    elif case == "size":
        kw = dict(height=24, width=24)
    elif case == "caption":
        (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "text": "a cat"}) + "\n")
    elif case == "branch":
        kw = dict(branch="both")
    elif case == "count":
        kw = dict(images=ImageSource(kind="folder", path=str(folder), num_images=5))
    with pytest.raises(UsageError, match=message):
        harvest(config(tmp_path, "sd1", **kw), pipe=pipe)
    assert not (tmp_path / "store").exists()


def test_toy_captions_with_unknown_words_are_refused(tmp_path, random_toy_pipe):
    image_folder(tmp_path, size=64)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"file": f, "text": "a purple unicorn"}) + "\n" for f in CAPTIONS))
    with pytest.raises(UsageError, match="unicorn"):
        harvest(config(tmp_path, "sd1", model="toy", sites=["mid_block.attentions.0"]), pipe=random_toy_pipe)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("family, method", [("sd1", "direct"), ("sd3", "total")])
def test_feature_reruns_of_a_real_image_store_read_the_images_again(tmp_path, family, method):
    """The feature analysis reruns a store's top examples: for real images it reads them again
    (not generates), so the rerun activation equals the stored one."""
    from analysis.feature_heads import feature_head_attribution
    from analysis.features import compute_feature_stats
    from sae.config import SparseCoderConfig
    from sae.registry import get_architecture

    pipe = build_tiny_pipeline(family)
    pipe.vae.register_to_config(scaling_factor=1.0)  # the tiny VAE's latents at full size: x_t must show the image
    image_folder(tmp_path)
    # not step 0: at sigma = 1 a flow-matching x_t is the noise alone, the same as a generation's
    cfg = config(tmp_path, family, sites=[SITES[family][0]], timesteps={"steps": [1, 2]})
    harvest(cfg, pipe=pipe)
    site = ActivationStore(cfg.out).site(SITES[family][0])
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=16, k=3), site.width)
    sae.placement.site = SITES[family][0]
    st = compute_feature_stats(sae, site, progress=False)
    f = int(torch.argmax(st.top_act[:, 0]))
    res = feature_head_attribution(sae, pipe, cfg.out, st, method=method, features=[f], examples=2, progress=False)
    assert res["examples"][f] == 2
    # tight: a rerun that generated instead of reading lands within 1e-3 on the tiny SD3
    torch.testing.assert_close(res["activation"][f], res["store_activation"][f], rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("family", ["sd2", "sdxl", "flux"])
def test_every_family_reads_real_images_from_a_datasets_image_column(tmp_path, family):
    import datasets

    rng = np.random.default_rng(1)
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)],
                                     "caption": ["a red cat", "a dog", ""]}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    pipe = build_tiny_pipeline(family)
    from activations.sites import list_sites

    block = next(s.name for s in list_sites(pipe) if s.kind == "block" and s.resolution[0] > 1)
    cfg = HarvestConfig(model=f"tiny-{family}", out=str(tmp_path / "store"), sites=[block], num_inference_steps=3,
                        guidance_scale=3.0, timesteps="all", branch="cond", batch_size=2, images_per_shard=2, progress=False,
                        images=ImageSource(kind="dataset", path=str(tmp_path / "ds"), column="img", caption_column="caption"))
    harvest(cfg, pipe=pipe)
    store = ActivationStore(cfg.out, verify=True)
    site = store.site(block)
    assert site.num_rows == 3 * 3 * site.grid[0] * site.grid[1]  # images x steps x positions
    assert [r["text"] for r in store.prompts()] == ["a red cat", "a dog", ""]
    assert store.prompts()[2]["source"].endswith("[2].img")
