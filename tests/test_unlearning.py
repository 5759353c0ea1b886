"""benchmarks/unlearning.py and the binding measure of steering_eval.py's strengthening cell: their
input checks and scores (the benchmarks' own helpers; no generation)."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from toyworld.oracle import check_image
from toyworld.render import render
from toyworld.scene import Obj, Scene

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))  # unlearning imports steering_eval as a sibling
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def unlearning():
    return _load("unlearning")


@pytest.fixture(scope="module")
def steering_eval():
    return _load("steering_eval")


@pytest.mark.parametrize("argv, words", [
    (["--sites", "up_blocks.9.attentions.0"], ["--sites", "up_blocks.9.attentions.0", "valid: all", "mid_block.attentions.0"]),
    (["--targets", "plaid"], ["--targets", "plaid", "striped"]),
    (["--strength", "nan"], ["--strength", "nan"]),
    (["--sites", "all", "--sae", "runs/sae"], ["--sae", "13"]),
    (["--prompts", "0"], ["--prompts", ">= 1"]),
    (["--when", "dusk"], ["--when", "dusk", "early"]),
])
def test_unlearning_refuses_bad_input_in_one_line(unlearning, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        unlearning.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("unlearning: error: ")
    for w in words:
        assert w in err


def test_unlearning_sites_all_is_every_attention_block(unlearning):
    args = unlearning.parse_args(["--sites", "all"])
    assert len(args.sites) == 13 and "up_blocks.2.attentions.0" in args.sites
    assert all(".attn2" not in s for s in args.sites)
    assert unlearning.parse_args(["--sites", "mid_block.attentions.0, up_blocks.1.attentions.1"]).sites == [
        "mid_block.attentions.0", "up_blocks.1.attentions.1"]


def test_unlearning_measures_count_removal_other_values_and_other_attributes(unlearning):
    others = ["shape", "color"]
    # asked for the target: 3 of 4 images no longer show it; asked for other values: 1 of 2 drawn
    ua_reads = {"texture": [False, False, False, True], "shape": [True] * 4, "color": [True, True, False, True]}
    ira_reads = {"texture": [True, False], "shape": [True, True], "color": [True, True]}
    m = unlearning.measures(ua_reads, ira_reads, "texture", others)
    assert m["ua"] == 0.75 and m["ira"] == 0.5
    assert m["cra_by_attribute"] == {"shape": 1.0, "color": pytest.approx(5 / 6, abs=1e-4)}
    assert m["cra"] == pytest.approx((1 + 5 / 6) / 2, abs=1e-4)
    assert m["cra_all"] == pytest.approx(5 / 6, abs=1e-4)


def test_strengthening_success_fails_a_colour_drawn_on_the_wrong_object():
    """steering_eval's hrv_strengthen cell scores binding: each object's asked value at its position."""
    a = Obj(shape="circle", color="red", position="top left", size="small", texture="plain")
    b = Obj(shape="square", color="blue", position="bottom right", size="small", texture="striped")
    asked = Scene((a, b), "white", "day")
    swapped = Scene((dataclasses.replace(a, color="blue"), dataclasses.replace(b, color="red")), "white", "day")
    assert check_image(asked, render(asked).image)["color"]
    assert not check_image(asked, render(swapped).image)["color"]
    assert check_image(asked, render(swapped).image)["shape"]  # only the swapped attribute fails


def test_strengthening_scenes_have_two_objects(steering_eval):
    scenes = steering_eval.two_object_scenes(6, seed=3)
    assert len(scenes) == 6 and all(len(s.objects) == 2 for s in scenes)
    assert scenes == steering_eval.two_object_scenes(6, seed=3)
