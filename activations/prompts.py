"""Prompt sets for harvesting: a text file, a `datasets` dataset, an inline list, or a registered source.

Every source is indexable by prompt index, so any process can compute its own prompts without
reading the others', and a registered source's prompt is a pure function of (seed, index): rerunning or
splitting a harvest over ranks gives the same prompts.
"""

from __future__ import annotations

from pathlib import Path


from activations.config import PromptSource
from common import plugins
from common.errors import UsageError


BUILTIN_KINDS = ("file", "list", "dataset")


class PromptSet:
    """The prompts of a harvest: a file, a list, a `datasets` dataset, or a registered prompt
    source (``common.plugins``; ``toyworld`` is one), indexable by prompt index."""

    def __init__(self, source: PromptSource, seed: int = 0):
        self.source = source
        self.seed = seed
        self._texts = None
        self._dataset = None
        self.plugin = None
        kind = source.kind
        if kind == "file":
            if not source.path:
                raise UsageError("prompts.kind 'file' needs prompts.path (a text file, one prompt per line)")
            path = Path(source.path)
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
            self._texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        elif kind == "list":
            self._texts = [t for t in source.texts if t.strip()]
        elif kind == "dataset":
            self._dataset = _load_dataset(source)
        else:
            self.plugin = plugins.prompt_source(kind)(source, seed)
        available = len(self._texts) if self._texts is not None else len(self._dataset) if self._dataset is not None else len(self.plugin)
        n = source.num_prompts if source.num_prompts is not None else available
        if n > available:
            raise UsageError(f"prompts.num_prompts={n} but the {kind} source holds only {available} prompts")
        if n < 1:  # an empty store would look like a finished harvest
            where = f" ({source.path})" if source.path else ""
            raise UsageError(f"the prompt set must hold at least 1 prompt, got 0 from the {kind} source{where}")
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def text(self, index: int) -> str:
        if not 0 <= index < self.n:
            raise IndexError(f"prompt {index} out of range (0..{self.n - 1})")
        if self._texts is not None:
            return self._texts[index]
        if self._dataset is not None:
            return str(self._dataset[index][self.source.column])
        return self.plugin.text(index)

    def ground_truth(self, index: int) -> dict | None:
        """What a registered prompt source knows of prompt ``index`` (saved beside its image)."""
        return None if self.plugin is None else self.plugin.ground_truth(index)

    def truth_image(self, index: int):
        return None if self.plugin is None else self.plugin.truth_image(index)


def check_prompts(model: str, texts) -> None:
    """Refuse prompts the model cannot read, before anything is written: a registered model with
    a closed vocabulary (e.g. ``toy``) checks each one and names the bad words."""
    plugin = plugins.model_plugin(model)
    if plugin is None or plugin.check_prompt is None:
        return
    for text in texts:
        plugin.check_prompt(text)


def _load_dataset(source: PromptSource):
    if not source.path:
        raise UsageError("prompts.kind 'dataset' needs prompts.path (a dataset name or local folder)")
    return open_dataset(source.path, source.split, [source.column], "prompts")


def open_dataset(path: str | None, split: str, columns: list[str], what: str):
    """The ``columns`` of a ``datasets`` dataset (a local folder saved with save_to_disk, or a name
    for load_dataset); a missing split or column is a UsageError naming the valid ones."""
    import datasets

    if not path:
        raise UsageError(f"{what}.kind 'dataset' needs {what}.path (a dataset name or local folder)")
    folder = Path(path)
    if folder.is_dir() and ((folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()):
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UsageError(f"split {split!r} not in dataset {path!r}; valid splits: {', '.join(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(path, split=split)
    for column in columns:
        if column not in ds.column_names:
            raise UsageError(f"column {column!r} not in dataset {path!r}; valid columns: {', '.join(ds.column_names)}")
    return ds.select_columns(columns)
