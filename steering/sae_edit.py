"""``SAEFeatureEdit``: an SAE splice that edits one feature (inject, scale, ablate), writable to a recipe.

``sae.splice(edit=fn)`` takes a Python function, which a recipe cannot hold; this kind names the
edit by its fields (feature, mode, value) so that an explorer edit exports as YAML and
``run_recipe`` rebuilds the same function. With the error term kept, the site's value changes by
the edited feature's contribution only (see ``sae.splice``); the mask picks the patches.
"""

from __future__ import annotations

import dataclasses

import torch

from activations.intervention import register_intervention
from sae.splice import SAESplice, _with_sae_path

MODES = ("inject", "scale", "ablate")


@register_intervention("sae_feature_edit")
@dataclasses.dataclass(kw_only=True, eq=False)
class SAEFeatureEdit(SAESplice):
    """Edit latent ``feature``: ``inject`` adds ``value`` to it, ``scale`` multiplies it by
    ``value``, ``ablate`` sets it to zero."""

    feature: int = 0
    """the SAE latent to edit"""
    mode: str = "scale"
    """inject (add value), scale (multiply by value) or ablate (set to zero)"""
    value: float = 0.0
    """the amount injected or the factor (ignored by ablate)"""

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"unknown SAE edit mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        m = self.sae.num_latents
        if not 0 <= int(self.feature) < m:
            raise ValueError(f"SAE feature {self.feature} out of range; this SAE has {m} features (valid: 0..{m - 1})")
        self.feature, self.value = int(self.feature), float(self.value)
        self.edit = self._edit

    def _edit(self, z: torch.Tensor) -> torch.Tensor:  # dense latents [n, m]
        z = z.clone()
        f = self.feature
        if self.mode == "inject":
            z[:, f] = z[:, f] + self.value
        elif self.mode == "scale":
            z[:, f] = z[:, f] * self.value
        else:
            z[:, f] = 0.0
        return z

    def to_dict(self):
        source = getattr(self.sae, "source", None)
        if source is None:
            raise ValueError("an SAE feature edit can be written to a recipe only for an SAE loaded from a folder")
        return _with_sae_path(self, source)
