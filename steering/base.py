"""Steering edits that span sites: one recipe line, several protocol interventions.

Some edits a user writes in one line act at many sites (an HRV edit touches every cross-attention
head; a head edit names global heads that live in several modules) or need the pipeline to be
resolved (a token given as a word, another prompt to encode). They are still registered
Intervention kinds, so they serialise to recipes; ``expand(pipe, prompts)`` turns one into the
plain per-site interventions of ``activations.edits`` that ``steer`` attaches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from activations.intervention import Intervention


@dataclasses.dataclass(kw_only=True, eq=False)
class Composite(Intervention):
    """An intervention that ``steer`` expands into per-site interventions (see the module doc)."""

    stage: str = "heads"

    def expand(self, pipe, prompts: Sequence[str] | None) -> list[Intervention]:
        raise NotImplementedError

    def apply(self, x, call):
        raise RuntimeError(f"{type(self).__name__} spans several sites: attach it with steering.steer(pipe, ...), "
                           f"not activations.intervene")

    def gate(self) -> dict:
        """The gate fields every expanded intervention inherits (when, branch, mask)."""
        return {"when": self.when, "branch": self.branch, "mask": self.mask}


def head_sites(pipe) -> list:
    from activations.sites import list_sites

    return [s for s in list_sites(pipe.unet) if s.kind == "head"]


def heads_by_site(pipe, heads) -> dict[str, list[int]]:
    """Global head indices or (site, local head) pairs -> {site: [local heads]} in head order."""
    sites = head_sites(pipe)
    total = sum(s.heads for s in sites)
    by_name = {s.name: s for s in sites}
    out: dict[str, list[int]] = {}
    for h in heads:
        if isinstance(h, (list, tuple)):
            if len(h) != 2 or h[0] not in by_name:
                raise ValueError(f"head {list(h)!r} is not a (site, head) pair of this model; valid sites: {', '.join(by_name)}")
            site, local = by_name[h[0]], int(h[1])
            if not 0 <= local < site.heads:
                raise ValueError(f"head {local} out of range at {site.name} with {site.heads} heads (valid: 0..{site.heads - 1})")
        else:
            g = int(h)
            if not 0 <= g < total:
                raise ValueError(f"global head {g} out of range for this model's {total} cross-attention heads (valid: 0..{total - 1})")
            site = next(s for s in sites if s.first_head <= g < s.first_head + s.heads)
            local = g - site.first_head
        out.setdefault(site.name, [])
        if local not in out[site.name]:
            out[site.name].append(local)
    return {s.name: sorted(out[s.name]) for s in sites if s.name in out}
