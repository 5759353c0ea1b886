"""Concept words encoded once: the text-encoder states of every word's semantic tokens.

Each word is encoded the way the pipeline encodes a prompt (``activations.text.encode_prompts``: SD's
one text encoder, SDXL's two encoders' penultimate states concatenated), then only its own tokens are kept
(Park et al., ICLR 2025, Section 3). The words of concept c share ``L_c`` slots (the most tokens of
any of its words); a shorter word leaves slots masked, so a batch of rows with different sampled
words is one dense tensor.

Options beyond the paper (``HRVConfig.words`` / ``sink``): a word's states read where the HRV
prompts name it (``in_context_states``), and the start token as one more slot of no concept.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from activations.families import architecture_of
from activations.text import encode_prompts, semantic_mask, text_layout, word_positions
from analysis.concepts import ConceptList, word_token_positions
from common.errors import UsageError


@dataclasses.dataclass
class WordBank:
    concepts: ConceptList
    embeds_TC: torch.Tensor | None  # [T_all, C]: semantic-token states of all words, word after word (U-Nets)
    index_per_concept: list[torch.Tensor]  # concept c: [n_words_c, L_c] rows into embeds_TC (0 where masked)
    mask_per_concept: list[torch.Tensor]  # concept c: [n_words_c, L_c] bool, True on a real token
    slot_concept_S: torch.Tensor  # [S]: the concept of each slot, S = sum_c L_c (+ 1: the sink, concept C)
    sink: bool = False
    """the last row is the prompt's start token, a slot of every contest that counts for no
    concept (see ``encode_words``)"""
    stream_keys: dict[str, torch.Tensor] | None = None
    """MMDiTs: {site: [steps, heads, T_all, d]} the words' keys at each site and step, read
    through the text stream (``encode_words``), in place of ``embeds_TC``"""
    num_rows: int = 0
    """T_all: rows of all words (and the sink)"""

    @property
    def num_words(self) -> list[int]:
        return [len(ws) for ws in self.concepts.words]

    def slots(self, choice_bC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows into embeds_TC [b, S] and slot mask [b, S] for one chosen word per concept and row."""
        idx, mask = [], []
        for c, (index_wL, mask_wL) in enumerate(zip(self.index_per_concept, self.mask_per_concept)):
            idx.append(index_wL[choice_bC[:, c]])
            mask.append(mask_wL[choice_bC[:, c]])
        if self.sink:
            b = choice_bC.shape[0]
            idx.append(torch.full((b, 1), self.num_rows - 1, dtype=torch.long))
            mask.append(torch.ones(b, 1, dtype=torch.bool))
        return torch.cat(idx, 1), torch.cat(mask, 1)


def _tokenizer(pipe):
    """The tokenizer of the text's first segment (``activations.text.text_layout``): the one whose
    ids say which words a prompt names."""
    tok = next((seg.tokenizer for seg in text_layout(pipe) if seg.tokenizer is not None), None)
    if tok is None:
        raise UsageError("the pipeline has no tokenizer; HRVs need one to find each word's tokens")
    return tok


def _find(ids: list[int], word: list[int]) -> int:
    """Start of the first run of ``word`` in ``ids``, or -1."""
    for i in range(len(ids) - len(word) + 1):
        if ids[i: i + len(word)] == word:
            return i
    return -1


def occurrences(pipe, words: list[str], positions: list[list[int]], prompts: list[str]) -> list[list[int]]:
    """[words][prompts]: where each word's semantic tokens (``positions`` in its own encoding) start
    in each prompt's encoding, -1 where the prompt does not name it."""
    tok = _tokenizer(pipe)
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    full = tok(words, truncation=True, max_length=tok.model_max_length).input_ids
    return [[_find(row, [word[p] for p in pos]) for row in ids] for word, pos in zip(full, positions)]


def named_words(pipe, concepts: ConceptList, prompts: list[str]) -> torch.Tensor:
    """[prompts, concepts] long: the index (within its concept) of the first word of each concept a
    prompt names, -1 where it names none."""
    tok = _tokenizer(pipe)
    flat = [w for ws in concepts.words for w in ws]
    where = occurrences(pipe, flat, [word_token_positions(tok, w) for w in flat], prompts)  # one pass over the prompts
    out = torch.full((len(prompts), len(concepts)), -1, dtype=torch.long)
    first = 0
    for c, ws in enumerate(concepts.words):
        for p in range(len(prompts)):
            hits = [(where[first + j][p], j) for j in range(len(ws)) if where[first + j][p] >= 0]
            if hits:
                out[p, c] = min(hits)[1]
        first += len(ws)
    return out


def in_context_states(pipe, words: list[str], positions: list[list[int]], contexts: list[str],
                      max_contexts: int = 16) -> list[torch.Tensor]:
    """Each word's token states [n_tokens, C] averaged over (up to ``max_contexts`` of) the prompts
    of ``contexts`` that contain it, read at the word's place in each prompt: what the U-Net's heads
    see of the word in a real prompt (a causal text encoder gives a word alone other states)."""
    found: list[list[tuple[int, int]]] = []  # per word: (prompt, start)
    for w, starts in zip(words, occurrences(pipe, words, positions, contexts)):
        hits = [(k, i) for k, i in enumerate(starts) if i >= 0][:max_contexts]
        if not hits:
            raise UsageError(f"concept word {w!r} occurs in none of the {len(contexts)} HRV prompts; in_context "
                             "HRVs read each word where a prompt names it (add prompts that do, or use words: alone)")
        found.append(hits)
    need = sorted({k for hits in found for k, _ in hits})
    states = dict(zip(need, encode_prompts(pipe, [contexts[k] for k in need]).float()))
    return [torch.stack([states[k][i: i + len(pos)] for k, i in hits]).mean(0) for hits, pos in zip(found, positions)]


def encode_words(pipe, concepts: ConceptList, contexts: list[str] | None = None, sink: bool = False, *,
                 steps: int | None = None, guidance: float | None = None) -> WordBank:
    """Encode every concept word once (a bad word raises, naming it) and lay out the slots.

    ``contexts``: take each word's states from the prompts that contain it (``in_context_states``)
    instead of from the word encoded alone (Park et al.). ``sink``: add the start token's state as
    a slot of every contest that counts for no concept. In a real prompt an image position that
    reads no word puts its attention on the start token; among concept words alone it must spread
    it over them, and on the toy world the many background positions then decide the vote.

    MMDiTs (``Architecture.text_stream``): every block changes the text, so a word has no key
    before it has run through the blocks. Its keys are read by drawing the word (or, with
    ``contexts``, each prompt that names it) with the HRV run's ``steps`` and ``guidance``, at every
    site and step (``analysis.mechanism.stream_keys``), and the bank holds them per site and step.
    """
    tok = _tokenizer(pipe)
    flat = [w for ws in concepts.words for w in ws]
    positions = []
    for name, ws in zip(concepts.names, concepts.words):
        for w in ws:
            try:
                positions.append(word_token_positions(tok, w))
            except ValueError as e:
                raise UsageError(f"concept {name!r}: {e}") from None
    tok2 = getattr(pipe, "tokenizer_2", None)
    if tok2 is not None and tok2 is not tok:  # SDXL, FLUX: both tokenizers must see the same tokens
        for w, pos in zip(flat, positions):
            if word_token_positions(tok2, w) != pos:
                raise UsageError(f"concept word {w!r} splits differently under the two tokenizers; use another word")
    if architecture_of(pipe).text_stream:
        keys, rows = _stream_bank(pipe, flat, contexts, sink, steps, guidance)
        embeds_TC = None
    else:
        if contexts is None:
            states_WTC = encode_prompts(pipe, flat).float()
            per_word = [states_WTC[k, pos] for k, pos in enumerate(positions)]
        else:
            per_word = in_context_states(pipe, flat, positions, contexts)
        if sink:  # the start token's state: the same for every prompt of a causal text encoder
            per_word.append(encode_prompts(pipe, [""]).float()[0, :1])
        embeds_TC, keys = torch.cat(per_word, 0), None
        rows = [len(state) for state in per_word]
    starts = [sum(rows[:k]) for k in range(len(rows))]
    index_per_concept, mask_per_concept, slot_concept = [], [], []
    k = 0
    for c, ws in enumerate(concepts.words):
        L = max(rows[k + j] for j in range(len(ws)))
        index_wL = torch.zeros(len(ws), L, dtype=torch.long)
        mask_wL = torch.zeros(len(ws), L, dtype=torch.bool)
        for j in range(len(ws)):
            n = rows[k + j]
            index_wL[j, :n] = torch.arange(starts[k + j], starts[k + j] + n)
            mask_wL[j, :n] = True
        index_per_concept.append(index_wL)
        mask_per_concept.append(mask_wL)
        slot_concept += [c] * L
        k += len(ws)
    if sink:
        slot_concept.append(len(concepts))
    return WordBank(concepts, embeds_TC, index_per_concept, mask_per_concept, torch.tensor(slot_concept), sink=sink,
                    stream_keys=keys, num_rows=sum(rows))


def _stream_bank(pipe, words: list[str], contexts: list[str] | None, sink: bool, steps: int | None,
                 guidance: float | None, max_contexts: int = 16) -> tuple[dict[str, torch.Tensor], list[int]]:
    """An MMDiT's word keys ``{site: [steps, heads, T_all, d]}`` and each word's token count.

    Alone, a word's tokens are its semantic tokens in every text segment (SD3: CLIP and T5); in
    context, its tokens where each of (up to ``max_contexts`` of) the prompts names it, averaged."""
    from analysis.mechanism import stream_keys

    if steps is None or guidance is None:
        raise UsageError("HRV words of an MMDiT are read by drawing them: encode_words needs the run's steps and guidance")
    if contexts is None:
        prompts = list(words)
        rows = [semantic_mask(pipe, [w])[0].nonzero().flatten().tolist() for w in words]
        groups = [[k] for k in range(len(words))]
    else:
        prompts, rows, groups = [], [], []
        for w in words:
            group, expected = [], int(semantic_mask(pipe, [w]).sum())
            for text in contexts:
                if len(group) == max_contexts:
                    break
                with contextlib.suppress(UsageError):  # a prompt that does not name the word
                    where = word_positions(pipe, text, w)
                    if len(where) == expected:  # named in full in every segment (not cut off)
                        rows.append(where)
                        prompts.append(text)
                        group.append(len(prompts) - 1)
            if not group:
                raise UsageError(f"concept word {w!r} occurs in none of the {len(contexts)} HRV prompts; in_context "
                                 "HRVs read each word where a prompt names it (add prompts that do, or use words: alone)")
            groups.append(group)
    if sink:  # the start token of the empty prompt
        prompts.append("")
        rows.append([0])
        groups.append([len(prompts) - 1])
    keys = stream_keys(pipe, prompts, rows, steps, guidance)
    offsets = [sum(len(r) for r in rows[:k]) for k in range(len(rows))]
    out = {}
    for site, k_ShRd in keys.items():
        per_word = [torch.stack([k_ShRd[:, :, offsets[p]: offsets[p] + len(rows[p])] for p in g]).mean(0) for g in groups]
        out[site] = torch.cat(per_word, 2)  # [steps, heads, T_all, d]
    return out, [len(rows[g[0]]) for g in groups]
