"""Sites of every model family: names, resolutions, widths, heads and the global head order."""

from __future__ import annotations

import json

import pytest

from activations.models import build_tiny_unet, build_unet, model_config
from activations.sites import head_table, list_sites, main, resolve_sites


def heads_of(sites):
    return [s for s in sites if s.kind == "head"]


def blocks_of(sites):
    return [s for s in sites if s.kind == "block"]


def assert_global_order(sites):
    """Head sites go down -> mid -> up, and global indices run contiguously through them."""
    hs = heads_of(sites)
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    keys = [(order[s.name.split(".")[0]], s.name) for s in hs]
    assert [k[0] for k in keys] == sorted(k[0] for k in keys)
    nxt = 0
    for s in hs:
        assert s.first_head == nxt
        nxt += s.heads


def test_sd1_family_sites():
    sites = list_sites(build_tiny_unet("sd1"))
    assert [s.name for s in blocks_of(sites)] == [
        "down_blocks.0.attentions.0",
        "down_blocks.1.attentions.0",
        "mid_block.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
    ]
    by = {s.name: s for s in sites}
    assert by["down_blocks.0.attentions.0"].resolution == (8, 8) and by["down_blocks.0.attentions.0"].width == 16
    assert by["mid_block.attentions.0"].resolution == (4, 4) and by["mid_block.attentions.0"].width == 32
    assert by["up_blocks.1.attentions.1"].resolution == (8, 8)
    head = by["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert (head.heads, head.head_dim, head.width, head.block) == (2, 16, 32, "mid_block.attentions.0")
    assert_global_order(sites)


def test_sd2_family_has_per_block_head_counts_and_linear_projections():
    unet = build_tiny_unet("sd2")
    assert unet.config.use_linear_projection
    by = {s.name: s for s in list_sites(unet)}
    assert by["down_blocks.0.attentions.0.transformer_blocks.0.attn2"].heads == 2
    assert by["down_blocks.1.attentions.0.transformer_blocks.0.attn2"].heads == 4
    assert by["mid_block.attentions.0.transformer_blocks.0.attn2"].heads == 4
    assert by["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].heads == 2
    assert all(s.head_dim == 8 for s in by.values() if s.kind == "head")
    assert_global_order(list(by.values()))


def test_sdxl_family_has_several_transformer_layers_per_block():
    unet = build_tiny_unet("sdxl")
    assert unet.config.addition_embed_type == "text_time"
    sites = list_sites(unet)
    by = {s.name: s for s in sites}
    assert "down_blocks.0.attentions.0" not in by  # SDXL's first block has no attention
    layers = [s.name for s in heads_of(sites) if s.block == "down_blocks.2.attentions.0"]
    assert layers == [f"down_blocks.2.attentions.0.transformer_blocks.{i}.attn2" for i in range(2)]
    blk = by["down_blocks.2.attentions.0"]
    assert blk.heads == 8 and blk.first_head == by[layers[0]].first_head
    assert by["mid_block.attentions.0"].heads == 8 and by["mid_block.attentions.0"].resolution == (2, 2)
    assert_global_order(sites)


def test_toy_model_has_13_cross_attention_modules_of_4_heads():
    from toyworld.model import build_pipeline

    sites = list_sites(build_pipeline().unet)
    hs = heads_of(sites)
    assert len(hs) == 13 and all(s.heads == 4 for s in hs)
    assert len(head_table(sites)) == 52
    assert sorted({s.resolution for s in hs}) == [(2, 2), (4, 4), (8, 8), (16, 16)]
    assert_global_order(sites)


def test_head_table_maps_global_heads_to_module_and_head():
    sites = list_sites(build_tiny_unet("sd2"))
    table = head_table(sites)
    assert len(table) == sum(s.heads for s in heads_of(sites))
    for s in heads_of(sites):
        for h in range(s.heads):
            assert table[s.first_head + h] == (s.name, h)


def test_resolve_sites_groups_and_forward_order():
    sites = list_sites(build_tiny_unet("sd1"))
    assert [s.kind for s in resolve_sites(sites, "blocks")] == ["block"] * 7
    assert len(resolve_sites(sites, ["heads"])) == 7
    picked = resolve_sites(sites, ["up_blocks.0.attentions.0", "down_blocks.0.attentions.0"])
    assert [s.name for s in picked] == ["down_blocks.0.attentions.0", "up_blocks.0.attentions.0"]


def test_unknown_site_names_closest_matches_and_valid_sites():
    sites = list_sites(build_tiny_unet("sd1"))
    with pytest.raises(KeyError) as err:
        resolve_sites(sites, ["mid_block.attention.0"])
    msg = str(err.value)
    assert "'mid_block.attention.0'" in msg and "Closest matches: mid_block.attentions.0" in msg
    assert "Valid sites: down_blocks.0.attentions.0" in msg


def test_unknown_model_config_lists_valid_configs():
    with pytest.raises(ValueError, match="sd-1.4") as err:
        model_config("sd-1.6")
    assert "Closest" in str(err.value)
    assert model_config("CompVis/stable-diffusion-v1-4")["name"] == "sd-1.4"
    assert model_config("sdxl")["name"] == "sdxl-base"


def test_sites_command_prints_a_table_and_json(capsys):
    assert main(["sd-1.4", "--kind", "head"]) == 0
    out = capsys.readouterr().out
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn2" in out
    assert "16 cross-attention modules, 128 heads" in out
    assert main(["sd-2.1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"name", "kind", "resolution", "width", "heads", "head_dim", "first_head"} <= set(data[0])
    from diffatlas.cli import main as diffatlas

    assert diffatlas(["sites", "sd-9"]) == 2  # the command raises; the dispatcher prints one line
    assert capsys.readouterr().err.startswith("diffatlas sites: error: unknown model config 'sd-9'")


def test_build_unet_gives_random_weights_of_the_config():
    unet = build_unet("sd-1.4", device="meta")
    assert unet.config.cross_attention_dim == 768
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(859.5e6, rel=1e-3)


# -- full-size structure (slow: deselected by default) ------------------------------------------

HRV_SD14_ORDER = (
    [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
    + ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    + [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in (1, 2, 3) for a in range(3)]
)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd-1.4", "sd-1.5"])
def test_full_sd1_has_16_modules_and_128_heads_in_hrv_order(name):
    sites = list_sites(build_unet(name, device="meta"))
    hs = heads_of(sites)
    assert [s.name for s in hs] == HRV_SD14_ORDER
    assert all(s.heads == 8 for s in hs) and len(head_table(sites)) == 128
    res = {s.name: s.resolution for s in blocks_of(sites)}
    assert res["down_blocks.0.attentions.0"] == (64, 64) and res["mid_block.attentions.0"] == (8, 8)
    assert res["down_blocks.2.attentions.1"] == (16, 16) and res["up_blocks.1.attentions.0"] == (16, 16)
    assert {s.width for s in blocks_of(sites) if s.resolution == (16, 16)} == {1280}


@pytest.mark.slow
def test_full_sdxl_base_has_1300_heads():
    sites = list_sites(build_unet("sdxl-base", device="meta"))
    assert len(head_table(sites)) == 1300
    assert len(heads_of(sites)) == 70
    assert len(blocks_of(sites)) == 11
    assert all(s.head_dim == 64 for s in heads_of(sites))


@pytest.mark.slow
def test_full_sd21_has_per_block_heads_of_dim_64():
    sites = list_sites(build_unet("sd-2.1", device="meta"))
    hs = heads_of(sites)
    assert len(hs) == 16 and sum(s.heads for s in hs) == 195
    assert [s.heads for s in hs][:6] == [5, 5, 10, 10, 20, 20]
    assert all(s.head_dim == 64 for s in hs)
