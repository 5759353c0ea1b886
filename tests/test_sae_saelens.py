"""SAELens' layout: `save_pretrained(layout="saelens")` loads in sae_lens with the same outputs
(needs the bench extra: pip install -e ".[bench]")."""

from __future__ import annotations

import pytest
import torch

from sae.config import Placement, SparseCoderConfig
from sae.registry import get_architecture

sae_lens = pytest.importorskip("sae_lens")


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_saelens_layout__loads_in_sae_lens_with_the_same_outputs(arch, tmp_path):
    torch.manual_seed(0)
    ours = get_architecture(arch)(SparseCoderConfig(architecture=arch, num_latents=64, k=4), 16)
    with torch.no_grad():
        ours.encoder.bias.normal_(0, 0.1)
        ours.b_dec.normal_(0, 0.1)
        if hasattr(ours, "threshold"):
            ours.threshold.fill_(0.05)
    ours.placement = Placement(site="mid_block.attentions.0", model="toy")
    ours.save_pretrained(tmp_path / "lens", layout="saelens")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "lens")
    x = torch.randn(32, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x).to_dense(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == "mid_block.attentions.0"


def test_unknown_layout__names_the_valid_ones(tmp_path):
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=8, k=2), 4)
    with pytest.raises(ValueError, match="valid: sparsify, saelens"):
        sae.save_pretrained(tmp_path, layout="lens")
