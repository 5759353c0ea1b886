"""SAE folders that cannot be used are one line naming the file (and the field); SAELens' layout
loads back; an SAE of other weights is refused by `diffatlas analyze features`."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import UsageError
from sae.config import Placement, SparseCoderConfig
from sae.registry import get_architecture
from sae.sparse_coder import SAE

SITE = "mid_block.attentions.0"


def saved(tmp_path, arch="topk", d=8, m=32, k=4):
    torch.manual_seed(0)
    sae = get_architecture(arch)(SparseCoderConfig(architecture=arch, num_latents=m, k=k), d)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
    sae.placement = Placement(site=SITE, window="early", branch="cond", model="toy", model_revision="abc")
    return sae, sae.save_pretrained(tmp_path / "sae")


def edit_cfg(folder, change):
    path = folder / "cfg.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_truncated_weights__refused_naming_the_file(tmp_path):
    _, folder = saved(tmp_path)
    weights = folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UsageError, match=f"{weights}.*truncated"):
        SAE.from_pretrained(folder)


@pytest.mark.parametrize("field", ["k", "num_latents", "d_in", "architecture"])
def test_cfg_without_a_field__refused_naming_the_file_and_field(tmp_path, field):
    _, folder = saved(tmp_path)
    path = edit_cfg(folder, lambda d: d.pop(field))
    with pytest.raises(UsageError, match=f"{path} has no field '{field}'"):
        SAE.from_pretrained(folder)


def test_sparsify_cfg__names_no_architecture_and_loads_as_topk(tmp_path):
    ours, folder = saved(tmp_path)
    sparsify_keys = {"activation", "d_in", "expansion_factor", "k", "multi_topk", "normalize_decoder", "num_latents",
                     "skip_connection", "transcode"}  # what sparsify's SparseCoderConfig writes
    edit_cfg(folder, lambda d: [d.pop(key) for key in set(d) - sparsify_keys])
    back = SAE.from_pretrained(folder)
    assert back.cfg.architecture == "topk" and back.cfg.k == 4
    torch.testing.assert_close(back(torch.ones(2, 8)), ours(torch.ones(2, 8)))


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(num_latents=48), "says num_latents=48 but the weights .* have 32 latents"),
    (lambda d: d.update(k="four"), "field 'k' is 'four', not an int"),
    (lambda d: d.update(k=True), "field 'k' is True, not an int"),
    (lambda d: d.update(k=0), r"k must be in \[1, num_latents=32\]"),
    (lambda d: d.update(auxk_coefficient="x"), "field 'auxk_coefficient' is 'x', not a float"),
    (lambda d: d.update(architecture="gated"), "unknown SAE architecture 'gated'"),
    (lambda d: d.update(stage="probs"), "field 'stage' is 'probs'; valid: block, heads"),
    (lambda d: d.update(window="dawn"), "field 'window'.*unknown timestep window 'dawn'"),
])
def test_cfg_with_a_bad_value__refused_naming_the_file(tmp_path, change, needle):
    _, folder = saved(tmp_path)
    path = edit_cfg(folder, change)
    with pytest.raises(UsageError, match=f"{path}.*{needle}"):
        SAE.from_pretrained(folder)


@pytest.mark.parametrize("text, needle", [("[1, 2]", "holds a JSON list, not an SAE config"),
                                          ("{\"d_in\": 8,", "is not valid JSON")])
def test_cfg_that_is_not_a_json_object__refused_naming_the_file(tmp_path, text, needle):
    _, folder = saved(tmp_path)
    (folder / "cfg.json").write_text(text)
    with pytest.raises(UsageError, match=f"{folder / 'cfg.json'} {needle}"):
        SAE.from_pretrained(folder)
    with pytest.raises(UsageError, match=f"{folder / 'cfg.json'} {needle}"):
        SAE.from_pretrained(tmp_path, site=SITE)  # a folder of SAEs reads every cfg.json


def test_bad_sae_folder__is_one_line_from_the_dispatcher(tmp_path, capsys):
    from diffatlas.cli import main
    from sae.synthetic import write_sparse_store

    _, folder = saved(tmp_path)
    edit_cfg(folder, lambda d: d.pop("k"))
    store = write_sparse_store(tmp_path / "store", n=64, d=8, images=2)
    assert main(["analyze", "features", str(folder), str(store.dir.parent), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffatlas analyze features: error:") and "has no field 'k'" in err and err.count("\n") == 1


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_saelens_layout__loads_back_with_the_same_outputs_and_placement(tmp_path, arch):
    ours, _ = saved(tmp_path, arch)
    ours.save_pretrained(tmp_path / "lens", layout="saelens")
    back = SAE.from_pretrained(tmp_path / "lens")
    assert type(back) is type(ours) and back.placement == ours.placement and back.source == tmp_path / "lens"
    x = torch.randn(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_dense(x), ours.encode_dense(x))
        torch.testing.assert_close(back(x), ours(x))


def test_saelens_layout__another_librarys_folder_loads_by_its_own_fields(tmp_path):
    ours, _ = saved(tmp_path, "relu")
    folder = ours.save_pretrained(tmp_path / "lens", layout="saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"] = {"hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2"}  # what SAELens writes
    (folder / "cfg.json").write_text(json.dumps(cfg))
    back = SAE.from_pretrained(folder)
    assert back.cfg.architecture == "relu" and back.placement.site == "blocks.3.hook_resid_post"
    torch.testing.assert_close(back(torch.ones(2, 8)), ours(torch.ones(2, 8)))
    cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="normalize_activations is 'expected_average_only_in'; valid: none"):
        SAE.from_pretrained(folder)


def test_analyze_features__an_sae_of_other_weights_is_one_line(feature_analysis, tmp_path, capsys):
    from diffatlas.cli import main

    sae_folder, _, _ = feature_analysis
    sae = SAE.from_pretrained(sae_folder)
    sae.placement.model_revision = "0123456789abcdef"  # the weights of another model
    other = sae.save_pretrained(tmp_path / "other")
    out = tmp_path / "out"
    assert main(["analyze", "features", str(other), str(sae_folder.parent / "store"), "--out", str(out), "--wandb", "false",
                 "--html", "false", "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffatlas analyze features: error:") and "weights 0123456789abcdef" in err
    assert err.count("\n") == 1 and not out.exists()
