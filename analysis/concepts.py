"""Concept lists for head relevance vectors: names and their words, read from YAML and checked.

    concepts:
      color: [red, green, blue]
      position: [top left, top right, center]     # multi-token words are fine

A concept list needs at least two concepts (an argmax over one concept is meaningless), unique
names, at least one word per concept, and each word under one concept only. Whether each word has a semantic token depends on the
tokenizer; ``word_token_positions`` checks that once a pipeline is known.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from common import bundled
from common.errors import UnknownNameError, UsageError


@dataclasses.dataclass(frozen=True)
class ConceptList:
    """Concept names in order (the rows of an HRV) and each concept's words."""

    names: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "words", tuple(tuple(str(w) for w in ws) for ws in self.words))
        check_concepts(self.names, self.words)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise UnknownNameError(f"unknown concept {name!r}; valid concepts: {', '.join(self.names)}")
        return self.names.index(name)

    def to_dict(self) -> dict[str, list[str]]:
        return {n: list(ws) for n, ws in zip(self.names, self.words)}

    @classmethod
    def from_dict(cls, d: dict) -> "ConceptList":
        return cls(tuple(d), tuple(tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in d.values()))


def check_concepts(names, words) -> None:
    """Raise a ValueError naming the first problem: too few concepts, duplicates, empty lists, a word
    under two concepts."""
    if len(names) < 2:
        raise UsageError(
            f"a concept list needs at least 2 concepts (each head votes for the argmax concept; an argmax "
            f"over one is meaningless), got {len(names)}: {list(names)}"
        )
    seen = set()
    for name in names:
        if not name.strip():
            raise UsageError(f"concept names must be non-empty; got {list(names)}")
        if name in seen:
            raise UsageError(f"duplicate concept name {name!r}; concept names must be unique: {list(names)}")
        seen.add(name)
    for name, ws in zip(names, words):
        if not ws or not any(w.strip() for w in ws):
            raise UsageError(f"concept {name!r} has no words; give it at least one, e.g. {name}: [word1, word2]")
        blank = [w for w in ws if not w.strip()]
        if blank:
            raise UsageError(f"concept {name!r} has an empty word in {list(ws)}")
    owner: dict[str, str] = {}  # word -> the concept it is listed under first
    for name, ws in zip(names, words):
        for w in ws:
            first = owner.setdefault(" ".join(w.split()), name)
            if first != name:  # its contests would always tie, and argmax gives ties to the first
                raise UsageError(f"word {w!r} is listed under concepts {first!r} and {name!r}; list each word under one concept")


def resolve_concepts_path(spec: str | Path):
    """A YAML path, or the name of a shipped concept list (configs/concepts/: ``toy``, ``sd34``)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = bundled.configs("concepts")
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise FileNotFoundError(f"concept list {str(spec)!r} is neither a YAML file nor a shipped concept list; "
                            f"valid names: {', '.join(shipped)}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (plain YAML keeps the last one silently,
    which would drop a concept without a word)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({str(k) for k in keys if keys.count(k) > 1})
        if dup:
            raise UsageError(f"duplicate concept name(s) {dup} (line {node.start_mark.line + 1}); concept names must be unique")
        return super().construct_mapping(node, deep=deep)


def load_concepts(spec: str | Path) -> ConceptList:
    """Read ``concepts: {name: [words]}`` from a YAML file (or a configs/concepts/ name)."""
    path = resolve_concepts_path(spec)
    data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    if not isinstance(data, dict) or not isinstance(data.get("concepts"), dict):
        raise UsageError(f"{path}: expected a mapping 'concepts: {{name: [word, ...]}}' at the top level")
    raw = data["concepts"]
    for name in raw:
        if raw[name] is None:
            raise UsageError(f"{path}: concept {name!r} has no words; give it at least one")
    return ConceptList.from_dict({str(k): [str(w) for w in v] if isinstance(v, list) else [str(v)] for k, v in raw.items()})


def word_token_positions(tokenizer, word: str) -> list[int]:
    """Positions of ``word``'s semantic tokens in its encoding ``[start, tokens..., end, pad...]``.

    Start, end and padding tokens are dropped (Park et al., ICLR 2025, Section 3: only the word's
    own tokens). A word the tokenizer cannot represent (it maps to the unknown token, as the toy
    world's word-level tokenizer does for words outside its vocabulary) has no semantic token: a
    ValueError says so.
    """
    ids = tokenizer(word, truncation=True, max_length=tokenizer.model_max_length).input_ids
    special = set(tokenizer.all_special_ids)
    unk = tokenizer.unk_token_id
    positions = [i for i, t in enumerate(ids) if t not in special]
    unknown = [tokenizer.convert_ids_to_tokens(t) for t in ids if unk is not None and t == unk]
    known_unk_is_eos = unk is not None and unk in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    if unknown and not known_unk_is_eos:
        raise UsageError(
            f"concept word {word!r} has no semantic token for this tokenizer: it maps (partly) to the unknown "
            f"token {tokenizer.unk_token!r}; use words in the model's vocabulary"
        )
    if not positions:
        raise UsageError(f"concept word {word!r} has no semantic token for this tokenizer (only start/end/padding tokens)")
    return positions
