"""Prompt sets for harvesting: a text file, a `datasets` dataset, an inline list, or toyworld scenes.

Every source is indexable by prompt index, so any process can compute its own prompts without
reading the others', and a toyworld prompt is a pure function of (seed, index): rerunning or
splitting a harvest over ranks gives the same prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from activations.config import PromptSource


class PromptSet:
    def __init__(self, source: PromptSource, seed: int = 0):
        self.source = source
        self.seed = seed
        self._texts = None
        self._dataset = None
        kind = source.kind
        if kind == "file":
            if not source.path:
                raise ValueError("prompts.kind 'file' needs prompts.path (a text file, one prompt per line)")
            path = Path(source.path)
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
            self._texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        elif kind == "list":
            self._texts = [t for t in source.texts if t.strip()]
        elif kind == "dataset":
            self._dataset = _load_dataset(source)
        elif kind == "toyworld":
            if source.num_prompts is None:
                raise ValueError("prompts.kind 'toyworld' needs prompts.num_prompts (the generator is endless)")
        else:
            raise ValueError(f"unknown prompt source {kind!r}; valid: toyworld, file, dataset, list")
        available = len(self._texts) if self._texts is not None else len(self._dataset) if self._dataset is not None else None
        n = source.num_prompts if source.num_prompts is not None else available
        if available is not None and n > available:
            raise ValueError(f"prompts.num_prompts={n} but the {kind} source holds only {available} prompts")
        if n < 1:  # an empty store would look like a finished harvest
            where = f" ({source.path})" if source.path else ""
            raise ValueError(f"the prompt set must hold at least 1 prompt, got 0 from the {kind} source{where}")
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int):
        """The toyworld scene of prompt ``index`` (None for other sources)."""
        if self.source.kind != "toyworld":
            return None
        from toyworld.scene import sample_scene

        return sample_scene(np.random.default_rng([self.seed, index, 0]), split=self.source.scene_split)

    def text(self, index: int) -> str:
        if not 0 <= index < self.n:
            raise IndexError(f"prompt {index} out of range (0..{self.n - 1})")
        if self._texts is not None:
            return self._texts[index]
        if self._dataset is not None:
            return str(self._dataset[index][self.source.column])
        from toyworld.prompts import scene_to_prompt

        return scene_to_prompt(self.scene(index), np.random.default_rng([self.seed, index, 1]))


def check_prompts(model: str, texts) -> None:
    """Refuse prompts the model cannot read, before anything is written.

    Only the toy model has a closed vocabulary (its tokenizer maps other words to one unknown
    token); kept in this one function so that it can move behind a model plugin.
    """
    if model != "toy":
        return
    from toyworld.prompts import check_prompt

    for text in texts:
        check_prompt(text)


def _load_dataset(source: PromptSource):
    import datasets

    if not source.path:
        raise ValueError("prompts.kind 'dataset' needs prompts.path (a dataset name or local folder)")
    path = Path(source.path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise ValueError(f"split {source.split!r} not in dataset {source.path!r}; valid splits: {', '.join(ds)}")
            ds = ds[source.split]
    else:
        ds = datasets.load_dataset(source.path, split=source.split)
    if source.column not in ds.column_names:
        raise ValueError(f"column {source.column!r} not in dataset {source.path!r}; valid columns: {', '.join(ds.column_names)}")
    return ds.select_columns([source.column])
