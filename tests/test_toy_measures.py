"""The measures of benchmarks/toy_fidelity.py that say whether the noise decides what a caption
leaves unsaid (the benchmark's own helpers, on renders of the world)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from toyworld.render import render
from toyworld.scene import Obj, Scene


@pytest.fixture(scope="module")
def fidelity():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "toy_fidelity.py"
    spec = importlib.util.spec_from_file_location("toy_fidelity", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_normalised_entropy__one_for_an_even_draw_zero_for_one_value(fidelity):
    colours = ["red", "green", "blue", "yellow", "purple", "cyan"]
    assert fidelity.normalised_entropy(colours * 5, "color") == pytest.approx(1.0)
    assert fidelity.normalised_entropy(["red"] * 32, "color") == 0.0
    half = fidelity.normalised_entropy(["red"] * 16 + ["blue"] * 16, "color")
    assert half == pytest.approx(0.3869, abs=1e-4)  # log 2 / log 6
    assert fidelity.normalised_entropy([], "color") == 0.0


def test_read_values__every_attribute_of_one_object_only_the_scene_of_two(fidelity):
    one = Scene((Obj("cross", "yellow", "bottom left", "small", "striped"),), "black", "night")
    assert fidelity.read_values(render(one).image) == fidelity.truth_values(one)
    two = Scene((Obj("cross", "yellow", "bottom left", "small"), Obj("circle", "red", "top right", "big")), "white", "day")
    assert fidelity.read_values(render(two).image) == {"background": "white", "style": "day"}


@pytest.mark.parametrize("argv, says", [
    (["--noise_seeds", "-1"], "--noise_seeds must be an integer >= 0, got -1"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--guidance", "0.5"], "--guidance must be a finite number >= 1, got 0.5"),
])
def test_fidelity__bad_numbers_are_one_line_before_any_work(fidelity, tmp_path, argv, says):
    with pytest.raises(SystemExit) as stop:
        fidelity.main([*argv, "--out", str(tmp_path / "o")])
    assert str(stop.value) == f"toy_fidelity: error: {says}"
    assert not (tmp_path / "o").exists()
