"""Concept words encoded once: the text-encoder states of every word's semantic tokens.

Each word is encoded the way the pipeline encodes a prompt (``pipe.encode_prompt``: SD's one text
encoder, SDXL's two encoders' penultimate states concatenated), then only its own tokens are kept
(Park et al., ICLR 2025, Section 3). The words of concept c share ``L_c`` slots (the most tokens of
any of its words); a shorter word leaves slots masked, so a batch of rows with different sampled
words is one dense tensor.
"""

from __future__ import annotations

import dataclasses

import torch

from analysis.concepts import ConceptList, word_token_positions


@dataclasses.dataclass
class WordBank:
    concepts: ConceptList
    embeds_TC: torch.Tensor  # [T_all, C]: semantic-token states of all words, word after word
    index_per_concept: list[torch.Tensor]  # concept c: [n_words_c, L_c] rows into embeds_TC (0 where masked)
    mask_per_concept: list[torch.Tensor]  # concept c: [n_words_c, L_c] bool, True on a real token
    slot_concept_S: torch.Tensor  # [S]: the concept of each slot, S = sum_c L_c

    @property
    def num_words(self) -> list[int]:
        return [len(ws) for ws in self.concepts.words]

    def slots(self, choice_bC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows into embeds_TC [b, S] and slot mask [b, S] for one chosen word per concept and row."""
        idx, mask = [], []
        for c, (index_wL, mask_wL) in enumerate(zip(self.index_per_concept, self.mask_per_concept)):
            idx.append(index_wL[choice_bC[:, c]])
            mask.append(mask_wL[choice_bC[:, c]])
        return torch.cat(idx, 1), torch.cat(mask, 1)


def _tokenizer(pipe):
    tok = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tok is None:
        raise ValueError("the pipeline has no tokenizer; HRVs need one to find each word's tokens")
    return tok


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings [b, T, C] exactly as the pipeline feeds them to the U-Net's cross-attention."""
    out = pipe.encode_prompt(prompt=prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return out[0]


def semantic_token_mask(pipe, prompts: list[str], length: int) -> torch.Tensor:
    """[b, length] bool: True on each prompt's own tokens, False on start, end and padding tokens."""
    tok = _tokenizer(pipe)
    ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    return ~torch.isin(ids, special)


def encode_words(pipe, concepts: ConceptList) -> WordBank:
    """Encode every concept word once (a bad word raises, naming it) and lay out the slots."""
    tok = _tokenizer(pipe)
    flat = [w for ws in concepts.words for w in ws]
    positions = []
    for name, ws in zip(concepts.names, concepts.words):
        for w in ws:
            try:
                positions.append(word_token_positions(tok, w))
            except ValueError as e:
                raise ValueError(f"concept {name!r}: {e}") from None
    tok2 = getattr(pipe, "tokenizer_2", None)
    if tok2 is not None and tok2 is not tok:  # SDXL: both tokenizers must see the same tokens
        for w, pos in zip(flat, positions):
            if word_token_positions(tok2, w) != pos:
                raise ValueError(f"concept word {w!r} splits differently under the two tokenizers; use another word")
    states_WTC = encode_prompts(pipe, flat).float()
    rows, starts = [], []
    for k, pos in enumerate(positions):
        starts.append(sum(len(r) for r in rows))
        rows.append(states_WTC[k, pos])
    embeds_TC = torch.cat(rows, 0)
    index_per_concept, mask_per_concept, slot_concept = [], [], []
    k = 0
    for c, ws in enumerate(concepts.words):
        L = max(len(positions[k + j]) for j in range(len(ws)))
        index_wL = torch.zeros(len(ws), L, dtype=torch.long)
        mask_wL = torch.zeros(len(ws), L, dtype=torch.bool)
        for j in range(len(ws)):
            n = len(positions[k + j])
            index_wL[j, :n] = torch.arange(starts[k + j], starts[k + j] + n)
            mask_wL[j, :n] = True
        index_per_concept.append(index_wL)
        mask_per_concept.append(mask_wL)
        slot_concept += [c] * L
        k += len(ws)
    return WordBank(concepts, embeds_TC, index_per_concept, mask_per_concept, torch.tensor(slot_concept))
