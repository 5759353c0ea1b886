"""Named models and prompt sources come from plugins: the toy world registers through entry points,
and a user's own names work the same way (registered at run time here)."""

from __future__ import annotations

import json

import pytest

from activations.config import HarvestConfig, PromptSource
from activations.harvest import harvest
from activations.models import build_tiny_pipeline
from activations.pipeline import load_pipeline
from activations.prompts import PromptSet
from activations.store import ActivationStore
from common import plugins


class Colours(plugins.PromptSourcePlugin):
    """A user's prompt source: 'a <colour> cat', with its colour as ground truth."""

    COLOURS = ("red", "green", "blue")

    def __len__(self):
        return len(self.COLOURS)

    def text(self, index):
        return f"a {self.COLOURS[index]} cat"

    def ground_truth(self, index):
        return {"colour": self.COLOURS[index]}


@pytest.fixture(scope="module")
def registered():
    """A tiny model and a prompt source registered for this module only: other tests (e.g. an
    unknown model's message, which lists the registered names) must not see them."""
    tiny = build_tiny_pipeline("sd1")
    with pytest.MonkeyPatch.context() as mp:
        for group in (plugins.MODELS, plugins.PROMPT_SOURCES):
            plugins.names(group)  # the entry points load into the registry that is restored afterwards
            mp.setitem(plugins._registry, group, dict(plugins._registry[group]))
        plugins.register_prompt_source("test-colours", Colours)
        plugins.register_model("test-tiny", plugins.ModelPlugin(load=lambda device=None, dtype=None: tiny,
                                                                check_prompt=lambda text: text))
        yield tiny


def test_toy_world__registered_through_entry_points():
    assert "toy" in plugins.names(plugins.MODELS)
    assert "toyworld" in plugins.names(plugins.PROMPT_SOURCES)
    texts = PromptSet(PromptSource(kind="toyworld", num_prompts=2), seed=0)
    assert len(texts) == 2 and texts.ground_truth(0)["scene"]["objects"]


def test_a_users_model_and_prompt_source__harvest_by_name(registered, tmp_path):
    assert load_pipeline("test-tiny") is registered
    cfg = HarvestConfig(model="test-tiny", out=str(tmp_path / "s"), sites=["mid_block.attentions.0"],
                        prompts=PromptSource(kind="test-colours"), num_inference_steps=2, guidance_scale=2.0,
                        batch_size=3, images_per_shard=3, progress=False)
    harvest(cfg, pipe=registered)
    store = ActivationStore(tmp_path / "s")
    assert store.texts([0, 1, 2]) == ["a red cat", "a green cat", "a blue cat"]
    assert json.loads((tmp_path / "s" / "images" / "2.json").read_text())["colour"] == "blue"


def test_unknown_prompt_source__names_the_registered_ones():
    with pytest.raises(ValueError, match="valid: file, dataset, list, .*toyworld"):
        PromptSet(PromptSource(kind="toyworlds", num_prompts=2))


def test_toy_world__its_ground_truth_comes_through_the_model_plugin(registered):
    # analysis and steering ask world_truth(model) and never import toyworld (tests/test_layers.py)
    from toyworld.plugin_truth import ToyTruth

    truth = plugins.world_truth("toy")
    assert isinstance(truth, ToyTruth)
    assert ("color", "red") in truth.concept_values()
    text, scene = truth.scorer().prompts("color", 1, seed=0)[0]
    assert truth.object_coverage(text, 8).shape == (8, 8) and truth.object_coverage(text, 8).max() == 1.0
    assert len(scene.objects) == 1 and truth.scorer().score("color", [], []) == []
    with pytest.raises(ValueError, match="model 'test-tiny' has no ground truth.*models with one: toy"):
        plugins.world_truth("test-tiny")


def test_hrv_prompts_outside_the_toy_vocabulary_are_refused_through_the_plugin(tmp_path):
    # analysis.construct checks a model's prompts through its plugin (no toyworld import), before loading it
    from analysis.config import HRVConfig
    from analysis.construct import build_hrv

    cfg = HRVConfig(model="toy", concepts="toy", prompts=PromptSource(kind="list", texts=["a red circle", "a purple unicorn"]),
                    out=str(tmp_path / "hrv"), progress=False, wandb=False)
    with pytest.raises(ValueError, match="unicorn"):
        build_hrv(cfg, pipe=object())  # never reached: the check comes first
