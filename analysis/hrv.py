"""Head relevance vectors (Park et al., ICLR 2025, Section 3).

For N concepts and H cross-attention heads, the HRV matrix [N, H] says how much each head serves
each concept. At every cross-attention call, each head compares its conditional-branch queries
with the keys of one sampled word per concept; the concept that draws the most attention, averaged
over the word's tokens and the image's positions, gets the head's vote. Votes are kept per
denoising step ([steps, N, H]), so HRVs of one timestep window can be computed as well.

    hrv = HRV.load("runs/hrv/toy")
    hrv.top_heads("position", 5)      # [(global head, site, local head, value), ...]
    hrv.window("early")               # HRV from the votes of steps with tau in [0.6, 1] only
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from einops import einsum, reduce

from analysis.concepts import ConceptList
from analysis.words import WordBank
from common.errors import UsageError

HRV_TENSORS = "hrv.safetensors"
HRV_META = "hrv.json"


# --------------------------------------------------------------------------------------------
# the vote of one call


def concept_strengths(q_bhnd: torch.Tensor, k_bhsd: torch.Tensor, mask_bs: torch.Tensor, slot_concept_s: torch.Tensor,
                      num_concepts: int, scale: float) -> torch.Tensor:
    """Strength of each concept per image and head, [b, h, concepts].

    softmax(Q_h K_hᵀ · scale) over the concatenated concept tokens (masked slots excluded), then a
    word's map is averaged over its tokens and over spatial positions (Section 3 of the paper).
    """
    return weighted_strengths(q_bhnd, k_bhsd, mask_bs, slot_weights(mask_bs, slot_concept_s, num_concepts), scale)


def slot_weights(mask_bs: torch.Tensor, slot_concept_s: torch.Tensor, num_concepts: int) -> torch.Tensor:
    """[b, S, concepts]: 1 / (tokens of the chosen word) on the word's slots, 0 elsewhere (and on a
    sink slot, concept index ``num_concepts``)."""
    onehot_sc = torch.nn.functional.one_hot(slot_concept_s, num_concepts + 1)[:, :num_concepts].float()
    weights_bsc = onehot_sc[None] * mask_bs[:, :, None].float()  # masked slots do not count
    return weights_bsc / weights_bsc.sum(1, keepdim=True).clamp_min(1)


def weighted_strengths(q_bhnd: torch.Tensor, k_bhsd: torch.Tensor, mask_bs: torch.Tensor, weights_bsc: torch.Tensor,
                       scale: float) -> torch.Tensor:
    scores_bhns = einsum(q_bhnd.float(), k_bhsd.float(), "b h n d, b h s d -> b h n s") * scale
    scores_bhns = scores_bhns.masked_fill(~mask_bs[:, None, None, :], float("-inf"))
    probs_bhs = reduce(scores_bhns.softmax(-1), "b h n s -> b h s", "mean")  # average over positions
    return einsum(probs_bhs, weights_bsc, "b h s, b s c -> b h c")  # average over the word's tokens


def head_votes(strengths_bhc: torch.Tensor) -> torch.Tensor:
    """Votes [concepts, h] of one call: each image's argmax concept gets +1 per head."""
    winner_bh = strengths_bhc.argmax(-1)
    onehot_bhc = torch.nn.functional.one_hot(winner_bh, strengths_bhc.shape[-1])
    return reduce(onehot_bhc, "b h c -> c h", "sum").long()


def normalise_rows(votes_ch: torch.Tensor) -> torch.Tensor:
    """Scale each concept's row to L1 norm H (the paper's final step); an all-zero row stays zero."""
    v = votes_ch.double()
    H = v.shape[-1]
    norm = v.abs().sum(-1, keepdim=True)
    return torch.where(norm > 0, v / norm.clamp_min(1e-30) * H, v).float()


# --------------------------------------------------------------------------------------------
# the HRV container


@dataclasses.dataclass
class HRV:
    """HRVs of one model and concept list, with the raw per-step votes behind them.

    votes: [steps, concepts, heads] int64, summed over images; step_t: the scheduler timestep of
    each step (from the first generation); head_table: global head -> (site, head in module).
    """

    concepts: ConceptList
    votes: torch.Tensor
    head_table: list[tuple[str, int]]
    step_t: list[int | None]
    num_train_timesteps: int = 1000
    meta: dict = dataclasses.field(default_factory=dict)  # prompts, seeds, steps, guidance, scheduler, model

    @property
    def hrv(self) -> torch.Tensor:
        """[concepts, heads] float32, each row with L1 norm H."""
        return normalise_rows(self.votes.sum(0))

    @property
    def num_heads(self) -> int:
        return len(self.head_table)

    def row(self, concept: str) -> torch.Tensor:
        return self.hrv[self.concepts.index(concept)]

    def order(self, concept: str, most_first: bool = True, tie_seed: int | None = None) -> list[int]:
        """Global heads sorted by relevance to ``concept``; ties (e.g. heads with no vote) broken by
        head index, or by a permutation seeded with ``tie_seed`` so that no resolution goes first."""
        r = self.row(concept).numpy()
        keys = -r if most_first else r
        tiebreak = np.arange(len(r)) if tie_seed is None else np.random.default_rng([tie_seed, 5]).permutation(len(r))
        return [int(h) for h in np.lexsort((tiebreak, keys))]

    def top_heads(self, concept: str, n: int = 10) -> list[tuple[int, str, int, float]]:
        """The ``n`` most relevant heads: (global head, site, head in module, HRV value)."""
        row = self.row(concept)
        return [(h, *self.head_table[h], float(row[h])) for h in self.order(concept)[:n]]

    def window(self, window) -> torch.Tensor:
        """HRVs [concepts, heads] from the votes of the steps whose tau lies in ``window``.

        ``window``: "early" (tau in [0.6, 1]), "middle" ([0.2, 0.6)), "late" ([0, 0.2)) or a (lo, hi)
        pair. The paper has one vector per concept; this splits it by when the heads vote.
        """
        from activations.timesteps import in_window, window_bounds

        window_bounds(window)  # a bad name raises listing the valid ones
        if any(t is None for t in self.step_t):
            raise UsageError("these HRVs have no timestep per step (step_t); windows cannot be computed")
        keep = torch.as_tensor(in_window(np.array(self.step_t), self.num_train_timesteps, window))
        return normalise_rows(self.votes[keep].sum(0))

    # -- files ---------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"hrv": self.hrv.contiguous(), "votes": self.votes.long().contiguous()}, str(folder / HRV_TENSORS))
        meta = {
            "concepts": self.concepts.to_dict(),
            "head_table": [{"head": h, "site": s, "local_head": j} for h, (s, j) in enumerate(self.head_table)],
            "step_t": self.step_t,
            "num_train_timesteps": self.num_train_timesteps,
            **self.meta,
        }
        (folder / HRV_META).write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, pipe=None) -> "HRV":
        """Read an HRV folder; with ``pipe``, refuse one built for another head layout."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (HRV_TENSORS, HRV_META):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not an HRV folder: {name} is missing (write one with `diffatlas analyze hrv`)")
        tensors = load_file(str(folder / HRV_TENSORS))
        meta = json.loads((folder / HRV_META).read_text())
        table = [(r["site"], int(r["local_head"])) for r in meta.pop("head_table")]
        hrv = cls(
            concepts=ConceptList.from_dict(meta.pop("concepts")),
            votes=tensors["votes"],
            head_table=table,
            step_t=meta.pop("step_t"),
            num_train_timesteps=int(meta.pop("num_train_timesteps", 1000)),
            meta=meta,
        )
        if pipe is not None:
            hrv.check_model(pipe)
        return hrv

    def check_model(self, pipe_or_unet) -> None:
        """Raise a ValueError when the model's head count or head table differs from this HRV's."""
        from activations.families import denoiser_of
        from activations.sites import head_table

        table = head_table(denoiser_of(pipe_or_unet))
        model = self.meta.get("model", "?")
        if len(table) != len(self.head_table):
            raise UsageError(
                f"HRV built for {len(self.head_table)} heads (model {model!r}) but this model has {len(table)} "
                f"cross-attention heads; build HRVs for this model with `diffatlas analyze hrv`"
            )
        for h, (mine, theirs) in enumerate(zip(self.head_table, table)):
            if tuple(mine) != tuple(theirs):
                raise UsageError(
                    f"HRV head table differs from this model's at head {h}: expected {mine[0]} head {mine[1]} "
                    f"(model {model!r}), the model has {theirs[0]} head {theirs[1]}"
                )


# --------------------------------------------------------------------------------------------
# counting votes during generation


class VoteCounter:
    """Accumulates votes during generation (the observer's state; see analysis.mechanism).

    Before each pipeline call, ``begin_batch(job_ids)`` draws every image's words for every
    (step, site) from a generator seeded by (seed, job id): the words do not depend on the batch
    an image lands in, so a resumed run samples exactly what an uninterrupted one would.
    """

    def __init__(self, bank: WordBank, sites: list, seed: int = 0, steps_hint: int = 1,
                 named_jC: torch.Tensor | None = None):
        """``named_jC`` [jobs, concepts]: a word index to use for that job and concept at every call
        instead of a drawn one (-1: draw), e.g. the word its prompt names (``words.named_words``)."""
        self.bank = bank
        self.named_jC = named_jC
        self.sites = {s.name: (i, s.first_head, s.heads) for i, s in enumerate(sites)}
        self.num_heads = sum(s.heads for s in sites)
        self.seed = seed
        C = len(bank.concepts)
        self.votes = torch.zeros(max(1, steps_hint), C, self.num_heads, dtype=torch.long)
        self.step_t: list[int | None] = [None] * self.votes.shape[0]
        self._keys: dict[str, torch.Tensor] = {}
        self._idx = self._mask = self._weights = None  # [b, steps, sites, ...] of the current batch
        self._pending = None  # this batch's votes on the model's device: no host sync per call

    def begin_batch(self, job_ids: list[int], steps: int) -> None:
        n_words = self.bank.num_words
        rows = []
        for j in job_ids:
            rng = np.random.default_rng([self.seed, int(j)])
            rows.append(np.stack([rng.integers(0, n, size=(steps, len(self.sites))) for n in n_words], -1))
        choice_bPC = torch.as_tensor(np.stack(rows), dtype=torch.long).flatten(1, 2)  # P = steps x sites
        if self.named_jC is not None:
            named_bC = self.named_jC[torch.as_tensor(job_ids, dtype=torch.long)]
            choice_bPC = torch.where(named_bC[:, None, :] >= 0, named_bC[:, None, :], choice_bPC)
        b, P, C = choice_bPC.shape
        idx, mask = self.bank.slots(choice_bPC.reshape(b * P, C))
        weights = slot_weights(mask, self.bank.slot_concept_S, C)
        # per (step, site): slot rows [b, S], mask [b, S], weights [b, S, C], computed once per batch
        shape = (b, steps, len(self.sites))
        self._idx = idx.view(*shape, -1)
        self._mask = mask.view(*shape, -1)
        self._weights = weights.view(*shape, *weights.shape[1:])
        self._grow(steps)
        self._pending = None

    def end_batch(self) -> None:
        """Add the batch's votes (kept on the model's device during generation) to ``votes``."""
        if self._pending is not None:
            self._grow(self._pending.shape[0])
            self.votes[: self._pending.shape[0]] += self._pending.cpu()
            self._pending = None

    def _grow(self, steps: int) -> None:
        if steps > self.votes.shape[0]:
            extra = torch.zeros(steps - self.votes.shape[0], *self.votes.shape[1:], dtype=torch.long)
            self.votes = torch.cat([self.votes, extra])
            self.step_t += [None] * extra.shape[0]

    def keys(self, call) -> torch.Tensor:
        """Keys [heads, T_all, d] of all concept words at this module: a U-Net's projected once, an
        MMDiT's read through the text stream for this step (``words.encode_words``)."""
        if self.bank.stream_keys is not None:  # an MMDiT: the words' keys at this site and step
            k_ShTd = self._keys.get(call.site)
            if k_ShTd is None:
                k_ShTd = self.bank.stream_keys[call.site].to(device=call.q_cond.device, dtype=call.q_cond.dtype)
                self._keys[call.site] = k_ShTd
            return k_ShTd[min(int(call.step or 0), k_ShTd.shape[0] - 1)]
        k = self._keys.get(call.site)
        if k is None:
            k = call.project_keys(self.bank.embeds_TC.to(device=call.q_cond.device, dtype=call.q_cond.dtype))
            self._keys[call.site] = k
        return k

    def on_call(self, call) -> None:
        """One cross-attention call (an analysis.mechanism.QueryCall)."""
        site_index, first, heads = self.sites[call.site]
        step = int(call.step or 0)
        self._grow(step + 1)
        if self.step_t[step] is None:
            self.step_t[step] = call.t
        p = (slice(None), min(step, self._idx.shape[1] - 1), site_index)
        idx_bS, mask_bS, weights_bSC = self._idx[p], self._mask[p], self._weights[p]
        if idx_bS.shape[0] != call.q_cond.shape[0]:
            raise RuntimeError(f"{call.q_cond.shape[0]} conditional rows but {idx_bS.shape[0]} images in the batch")
        keys_hTd = self.keys(call)
        device = call.q_cond.device
        k_bhSd = keys_hTd[:, idx_bS.to(device)].permute(1, 0, 2, 3)  # [h, b, S, d] -> [b, h, S, d]
        strengths = weighted_strengths(call.q_cond, k_bhSd, mask_bS.to(device), weights_bSC.to(device), call.scale)
        if self._pending is None or step >= self._pending.shape[0]:
            grown = torch.zeros(max(step + 1, self.votes.shape[0]), *self.votes.shape[1:], dtype=torch.long, device=device)
            if self._pending is not None:
                grown[: self._pending.shape[0]] = self._pending
            self._pending = grown
        self._pending[step, :, first:first + heads] += head_votes(strengths)
