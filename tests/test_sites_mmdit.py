"""Sites of the MMDiT families (SD3 / SD3.5, FLUX.1): names, token grids, heads, the text stream.

Tiny transformers are built in-process; the full-size configs build on the meta device.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from activations.families import architecture_of, denoiser_of
from activations.models import build_denoiser, build_tiny_transformer, build_unet, model_config, tiny_transformer_config
from activations.sites import head_table, list_sites, main, resolve_sites
from common.errors import UsageError


def names(sites, kind=None):
    return [s.name for s in sites if kind is None or s.kind == kind]


def tiny_inputs(family: str, model, text_tokens: int = 5, latent: int = 8):
    """Inputs of one forward call of a tiny transformer: a latent of latent x latent cells."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    text = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    t = torch.tensor([500.0])
    if family == "sd3":
        x = torch.randn(1, cfg.in_channels, latent, latent, generator=g)
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t)
    side = latent // 2  # FluxPipeline packs 2 x 2 latent cells per token
    x = torch.randn(1, side * side, cfg.in_channels, generator=g)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t / 1000,
                img_ids=img_ids.float(), txt_ids=torch.zeros(text_tokens, 3), guidance=torch.tensor([3.5]))


def blocks_in_order(model):
    return [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)] + [
        (f"single_transformer_blocks.{j}", b) for j, b in enumerate(getattr(model, "single_transformer_blocks", []))
    ]


def test_sd3_sites__a_block_its_text_stream_and_its_joint_attention_per_block():
    sites = list_sites(build_tiny_transformer("sd3"))
    assert names(sites) == [
        "transformer_blocks.0", "transformer_blocks.0.context", "transformer_blocks.0.attn",
        "transformer_blocks.1", "transformer_blocks.1.context", "transformer_blocks.1.attn",
        "transformer_blocks.2", "transformer_blocks.2.attn",  # the last block is context_pre_only
    ]
    by = {s.name: s for s in sites}
    block, text, head = by["transformer_blocks.1"], by["transformer_blocks.1.context"], by["transformer_blocks.1.attn"]
    assert (block.kind, block.resolution, block.width, block.block) == ("block", (4, 4), 16, "transformer_blocks.1")  # 8 / patch 2
    assert (text.kind, text.resolution, text.width, text.block) == ("block", (1, 333), 16, "transformer_blocks.1.context")
    assert (head.kind, head.heads, head.head_dim, head.width, head.first_head, head.block) == ("head", 2, 8, 16, 2, "transformer_blocks.1")
    assert [s.first_head for s in sites if s.kind == "head"] == [0, 2, 4]


def test_flux_sites__double_blocks_then_single_blocks_with_heads_numbered_on_through_both():
    sites = list_sites(build_tiny_transformer("flux"), 8, text_tokens=7)
    heads = [s for s in sites if s.kind == "head"]
    assert names(heads) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] + [
        f"single_transformer_blocks.{j}.attn" for j in range(3)
    ]
    assert [s.first_head for s in heads] == [0, 2, 4, 6, 8] and all((s.heads, s.head_dim) == (2, 8) for s in heads)
    assert {s.resolution for s in sites if not s.name.endswith(".context")} == {(4, 4)}  # 8 latent cells packed 2 x 2
    assert {s.resolution for s in sites if s.name.endswith(".context")} == {(1, 7)}
    assert names(sites, "block")[-2:] == ["single_transformer_blocks.1.context", "single_transformer_blocks.2"]
    # defaults: FluxPipeline's 128 x 128 latent and 512 T5 tokens
    by = {s.name: s for s in list_sites(build_tiny_transformer("flux"))}
    assert by["single_transformer_blocks.0"].resolution == (64, 64) and by["transformer_blocks.0.context"].resolution == (1, 512)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_context_site_exists_exactly_where_a_later_block_reads_the_block_text_output(family):
    """Perturb each block's text output in a real forward pass: the image changes iff the block
    has a context site. The block and context sites' token counts are those the blocks write."""
    torch.manual_seed(0)
    model = build_tiny_transformer(family)
    inputs = tiny_inputs(family, model, text_tokens=5, latent=8)
    sites = {s.name: s for s in list_sites(model, 8, text_tokens=5)}
    with torch.no_grad():
        clean = model(**inputs).sample
    for name, block in blocks_in_order(model):
        seen = {}

        def perturb(module, args, out):
            text, image = out
            seen["image"], seen["text"] = image.shape[1], None if text is None else text.shape[1]
            return (None if text is None else text + 1.0), image

        handle = block.register_forward_hook(perturb)
        with torch.no_grad():
            changed = not torch.equal(model(**inputs).sample, clean)
        handle.remove()
        assert seen["image"] == sites[name].tokens_per_image == 16, name
        has_context = f"{name}.context" in sites
        assert changed == has_context, name
        if has_context:
            assert seen["text"] == sites[f"{name}.context"].tokens_per_image == 5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_resolve_sites_and_head_table_work_on_mmdit_sites(family):
    model = build_tiny_transformer(family)
    sites = list_sites(model)
    table = head_table(model)
    heads = [s for s in sites if s.kind == "head"]
    assert len(table) == 2 * len(heads) and table[3] == (heads[1].name, 1)
    assert names(resolve_sites(sites, "heads")) == names(heads)
    assert "transformer_blocks.0.context" in names(resolve_sites(sites, "blocks"))
    picked = resolve_sites(model, ["transformer_blocks.1.attn", "transformer_blocks.0.context"])
    assert names(picked) == ["transformer_blocks.0.context", "transformer_blocks.1.attn"]
    with pytest.raises(KeyError, match="Closest matches: transformer_blocks.0.attn"):
        resolve_sites(sites, "transformer_blocks.0.attn2")


def test_family_declaration_finds_the_denoiser_of_a_pipeline_and_refuses_other_objects():
    model = build_tiny_transformer("flux")
    pipe = types.SimpleNamespace(transformer=model, vae=None)
    assert denoiser_of(pipe) is model and architecture_of(pipe).name == "flux"
    assert list_sites(pipe) == list_sites(model)
    assert architecture_of(build_tiny_transformer("sd3")).denoiser == "transformer"
    with pytest.raises(UsageError, match=r"^SimpleNamespace is neither .*SD3Transformer2DModel \(sd3\), FluxTransformer2DModel \(flux\)"):
        list_sites(types.SimpleNamespace(unet=None))


def test_dual_attention_self_attention_is_not_a_head_site():
    # SD3.5 Medium's attn2 attends over image tokens only: no text keys, so no head site
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**{**tiny_transformer_config("sd3"), "dual_attention_layers": (0,), "qk_norm": "rms_norm"})
    assert model.transformer_blocks[0].attn2 is not None
    assert names(list_sites(model), "head") == [f"transformer_blocks.{i}.attn" for i in range(3)]


def test_mmdit_configs_by_name_and_hub_id_and_their_denoiser_class():
    assert model_config("stabilityai/stable-diffusion-3-medium-diffusers")["name"] == "sd-3-medium"
    assert model_config("sd-3.5-large")["family"] == "sd3"
    assert model_config("black-forest-labs/FLUX.1-dev")["family"] == "flux"
    assert model_config("sd3")["name"] == "sd-3-medium" and model_config("flux")["name"] == "flux-1-dev"  # family names
    assert type(build_denoiser("flux-1-dev", device="meta")).__name__ == "FluxTransformer2DModel"
    with pytest.raises(UsageError, match=r"'sd-3-medium' is a sd3 model without a U-Net .* U-Net models: .*sd-1.4"):
        build_unet("sd-3-medium", device="meta")
    with pytest.raises(UsageError, match="valid families: sd3, flux"):
        tiny_transformer_config("sd1")


def test_sites_command_lists_mmdit_sites_with_token_grid_width_and_global_heads(capsys):
    assert main(["sd-3-medium"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("transformer_blocks.23.attn "))
    assert row == ["transformer_blocks.23.attn", "head", "64x64", "1536", "24", "64", "552"]
    assert "transformer_blocks.22.context" in out and "transformer_blocks.23.context" not in out
    assert out.rstrip().endswith("47 block sites, 24 joint attention modules, 576 heads")
    assert main(["flux-1-dev", "--kind", "head", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 57 and data[-1]["name"] == "single_transformer_blocks.37.attn" and data[-1]["first_head"] == 1344


def test_load_pipeline_of_an_mmdit_config_name_fails_at_once_in_one_line():
    from activations.pipeline import ModelNotFoundError, load_pipeline

    with pytest.raises(ModelNotFoundError, match=r"neither a registered model \(toy, toy-mmdit\), nor a diffusers folder, nor a hub id") as err:
        load_pipeline("sd-3-medium", device="cpu")
    assert "\n" not in str(err.value)


# -- full-size structure (slow: deselected by default) ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, blocks, heads, head_dim, total, contexts, params",
    [
        ("sd-3-medium", 24, 24, 64, 576, 23, 2.03e9),
        ("sd-3.5-large", 38, 38, 64, 1444, 37, 8.06e9),
        ("flux-1-dev", 19 + 38, 24, 128, 1368, 19 + 37, 11.90e9),
    ],
)
def test_full_mmdit_head_counts_grids_and_sizes(name, blocks, heads, head_dim, total, contexts, params):
    model = build_denoiser(name, device="meta")
    sites = list_sites(model)
    hs = [s for s in sites if s.kind == "head"]
    assert len(hs) == blocks and all((s.heads, s.head_dim) == (heads, head_dim) for s in hs)
    assert len(head_table(sites)) == total and hs[-1].first_head + heads == total
    assert sum(s.name.endswith(".context") for s in sites) == contexts
    assert {s.resolution for s in sites if not s.name.endswith(".context")} == {(64, 64)}  # 1024 px
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=2e-3)


@pytest.mark.slow
def test_full_sd35_large_normalises_q_and_k():
    attn = build_denoiser("sd-3.5-large", device="meta").transformer_blocks[0].attn
    assert type(attn.norm_q).__name__ == "RMSNorm" and type(attn.norm_k).__name__ == "RMSNorm"


def test_sites_command_reads_the_denoiser_class_of_a_pipeline_folder(tmp_path, capsys):
    from activations.models import build_tiny_unet

    build_tiny_transformer("flux").save_config(tmp_path / "flux" / "transformer")
    build_tiny_unet("sd1").save_config(tmp_path / "sd1" / "unet")
    assert main([str(tmp_path / "flux")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("9 block sites, 5 joint attention modules, 10 heads")
    assert main([str(tmp_path / "sd1")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("7 block sites, 7 cross-attention modules, 14 heads")
