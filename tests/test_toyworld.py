import itertools

import numpy as np
import pytest

from toyworld.oracle import compare, read_scene
from toyworld.prompts import WORDS, check_prompt, scene_to_prompt, split_words
from toyworld.render import render, token_labels
from toyworld.scene import ALL_OBJECTS, Obj, Scene, is_held_out, sample_scene
from toyworld.tokenizer import build_tokenizer
from toyworld.vocab import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLORS,
    POSITIONS,
    SHAPES,
    OBJECT_ATTRIBUTES,
    OBJECT_RGB,
    STYLES,
    apply_style,
)


def test_oracle__reads_clean_renders_at_least_99_percent_per_attribute():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, split="all") for _ in range(300)]
    hits = {}
    for scene in scenes:
        for name, ok in compare(scene, read_scene(render(scene).image)).items():
            hits[name] = hits.get(name, 0) + ok
    accuracy = {name: n / len(scenes) for name, n in hits.items()}
    assert set(accuracy) >= set(OBJECT_ATTRIBUTES) | {"background", "style"}
    assert min(accuracy.values()) >= 0.99, accuracy


def test_oracle__tolerates_noise_and_colour_drift():
    rng = np.random.default_rng(2)
    scene = Scene((Obj("triangle", "purple", "bottom right", "big", "striped"),), "white", "night")
    noisy = render(scene).image.astype(np.float32) + rng.normal(0, 8, (64, 64, 3)) + 6
    assert read_scene(np.clip(noisy, 0, 255).astype(np.uint8)) == scene


@pytest.mark.parametrize("shape", ["square", "cross", "triangle", "circle"])
def test_oracle__reads_a_small_shape_drawn_a_pixel_too_small_and_blurred(shape):
    # what a decoder does to small objects: shrink them a little and round their corners
    from toyworld.oracle import _blur
    from toyworld.render import shape_mask
    from toyworld.vocab import BACKGROUND_RGB, HALF_EXTENT, object_center

    scene = Scene((Obj(shape, "red", "top right", "small", "plain"),), "white", "day")
    drawn = _blur(shape_mask(shape, object_center("top right", "small"), HALF_EXTENT["small"] - 1).astype(np.float32), 0.8)
    image = (1 - drawn[..., None]) * np.array(BACKGROUND_RGB["white"]) + drawn[..., None] * np.array(OBJECT_RGB["red"])
    assert read_scene(image.round().astype(np.uint8)) == scene


def test_oracle__blank_image_raises_no_object_found():
    blank = np.full((64, 64, 3), 125, np.uint8)
    with pytest.raises(ValueError, match="no object"):
        read_scene(blank)


def test_palette__colours_stay_apart_within_each_style():
    for style in STYLES:
        palette = [apply_style(c, style) for c in list(OBJECT_RGB.values()) + list(BACKGROUND_RGB.values())]
        gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)]
        assert min(gaps) > 50, (style, min(gaps))


def test_render__each_object_has_its_own_non_overlapping_mask():
    rng = np.random.default_rng(3)
    for _ in range(50):
        rendered = render(sample_scene(rng, num_objects=2, split="all"))
        assert rendered.masks.shape == (2, 64, 64)
        assert rendered.masks.sum(axis=(1, 2)).min() > 20
        assert not (rendered.masks[0] & rendered.masks[1]).any()


@pytest.mark.parametrize("grid", [16, 8])
def test_token_labels__patches_show_the_object_under_them(grid):
    scene = Scene((Obj("square", "red", "top left", "big"), Obj("circle", "blue", "bottom right", "small")))
    labels = token_labels(scene, grid)
    cell = 64 // grid
    # the patch under the centre of the top-left object is red and square; a corner patch is background
    i, j = 15 // cell, 15 // cell
    assert labels["object"][i, j] == 0
    assert COLORS[labels["color"][i, j]] == "red"
    assert labels["object"][0, grid - 1] == -1 and labels["color"][0, grid - 1] == -1
    i, j = 49 // cell, 49 // cell
    assert OBJECT_ATTRIBUTES["shape"][labels["shape"][i, j]] == "circle"
    assert labels["coverage"].shape == (2, grid, grid)


def test_token_labels__grid_that_does_not_divide_the_image_is_refused():
    scene = Scene((Obj("square", "red", "top left"),))
    with pytest.raises(ValueError, match="grid 12 .* valid grids: .*16"):
        token_labels(scene, 12)


def test_scene__two_objects_at_one_position_is_refused_naming_it():
    with pytest.raises(ValueError, match="impossible scene: two objects at position 'center'"):
        Scene((Obj("square", "red", "center", "small"), Obj("circle", "blue", "center", "small")))


@pytest.mark.parametrize("a, b, rule", [
    (Obj("square", "red", "center", "small"), Obj("circle", "blue", "top left", "small"), "the center .* stands alone"),
    (Obj("square", "red", "top left", "big"), Obj("circle", "blue", "bottom right", "big"), "two big objects do not fit"),
])
def test_scene__overlapping_objects_are_refused_naming_the_rule(a, b, rule):
    with pytest.raises(ValueError, match=f"would overlap; .*{rule}"):
        Scene((a, b))


def test_scene__a_big_and_a_small_object_fit_in_any_two_corners():
    corners = [p for p in POSITIONS if p != "center"]
    for first, second in itertools.permutations(corners, 2):
        rendered = render(Scene((Obj("square", "red", first, "big"), Obj("square", "blue", second, "small"))))
        assert not (rendered.masks[0] & rendered.masks[1]).any()


@pytest.mark.parametrize("size, least", [("big", 0.15), ("small", 0.05)])
def test_render__objects_fill_the_frame_every_shape_at_every_position(size, least):
    covered = [render(Scene((Obj(shape, "red", position, size),))).masks[0].mean()
               for shape in SHAPES for position in POSITIONS]
    assert min(covered) >= least, (size, min(covered))


def test_scene__unknown_value_names_it_and_the_valid_values():
    with pytest.raises(ValueError, match=r"unknown color 'magenta'.*valid colors: red, green"):
        Obj("circle", "magenta", "center")
    with pytest.raises(ValueError, match=r"unknown shape 'circel' \(did you mean 'circle'\?\)"):
        Obj("circel", "red", "center")


def test_prompt__unknown_word_is_refused_with_the_valid_words():
    with pytest.raises(ValueError, match=r"'hexagon'.*valid words: .*circle"):
        check_prompt("a big red hexagon at the center on a gray background, by day")


def test_prompts__grammar_writes_only_vocabulary_words_that_the_tokenizer_knows():
    tokenizer = build_tokenizer()
    rng = np.random.default_rng(4)
    for _ in range(300):
        prompt = scene_to_prompt(sample_scene(rng, split="all"), rng)
        check_prompt(prompt)
        ids = tokenizer(prompt).input_ids
        assert tokenizer.unk_token_id not in ids
        assert len(ids) == len(split_words(prompt)) + 2 <= tokenizer.model_max_length
    assert set(WORDS) >= {"circle", "striped", "night", "left", ","}


def test_prompts__canonical_prompt_names_every_attribute():
    scene = Scene((Obj("circle", "red", "top left", "small", "striped"),), "gray", "night")
    assert scene_to_prompt(scene) == "a small red striped circle at the top left on a gray background, at night"


def test_split__training_captions_never_name_a_held_out_object_in_full():
    from toyworld.prompts import Named, draw_named, read_named

    held_out = [o for o in ALL_OBJECTS if is_held_out(o)]
    assert 0.05 < len(held_out) / len(ALL_OBJECTS) < 0.2
    for attribute, values in OBJECT_ATTRIBUTES.items():  # every value still trains with many partners
        assert {getattr(o, attribute) for o in ALL_OBJECTS if not is_held_out(o)} == set(values)
    rng = np.random.default_rng(5)
    drawn_held_out = 0
    for _ in range(3000):
        scene = sample_scene(rng, split="train")
        named = draw_named(scene, rng)
        objects, _ = read_named(scene_to_prompt(scene, rng, named))
        for obj, said in zip(scene.objects, objects):
            if is_held_out(obj):
                drawn_held_out += 1
                assert not {"shape", "color", "texture", "position"} <= set(said), (obj, said)
    assert drawn_held_out > 100  # held-out objects are drawn, only never named in full
    test_scene = sample_scene(rng, num_objects=1, split="test")
    assert is_held_out(test_scene.objects[0])
    assert Named.everything(test_scene).objects[0] == frozenset(OBJECT_ATTRIBUTES)


def test_prompts__grammar_writes_every_subset_of_attributes_and_check_prompt_accepts_it():
    from toyworld.prompts import Named, check_scene, read_named

    scene = Scene((Obj("triangle", "green", "bottom left", "big", "striped"),), "black", "night")
    every = list(ATTRIBUTES)
    rng = np.random.default_rng(6)
    for k in range(len(every) + 1):
        for subset in itertools.combinations(every, k):
            for short in (False, True) if 1 <= k <= 2 else (False,):
                named = Named((frozenset(subset) & frozenset(OBJECT_ATTRIBUTES),),
                              frozenset(subset) & {"background", "style"}, short=short)
                prompt = scene_to_prompt(scene, rng, named)
                check_scene(check_prompt(prompt))
                objects, scene_said = read_named(prompt)
                said = {**(objects[0] if objects else {}), **scene_said}
                assert said == {name: getattr(scene, name, None) or getattr(scene.objects[0], name)
                                for name in subset}, (subset, prompt)


def test_prompts__training_captions_leave_each_attribute_unsaid_at_the_drop_rate():
    from toyworld.prompts import DROP_PROB, draw_named, read_named

    rng = np.random.default_rng(7)
    said = {name: 0 for name in ATTRIBUTES}
    short = 0
    n = 3000
    for _ in range(n):
        scene = sample_scene(rng, num_objects=1)
        prompt = scene_to_prompt(scene, rng, draw_named(scene, rng))
        objects, scene_said = read_named(prompt) if prompt else ([], {})
        short += len(split_words(prompt)) <= 5
        for name in {**(objects[0] if objects else {}), **scene_said}:
            said[name] += 1
    for name, count in said.items():  # long captions name it with 1 - DROP_PROB, short ones rarely
        assert 0.45 < count / n < (1 - DROP_PROB) + 0.02, (name, count / n)
    assert short / n > 0.1


def test_prompts__parse_prompt_reads_back_every_scene_the_grammar_writes():
    from toyworld.prompts import PromptGrammarError, parse_prompt

    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = sample_scene(rng, split="all")
        assert parse_prompt(scene_to_prompt(scene, rng)) == scene
    with pytest.raises(PromptGrammarError, match="does not name object 1's position"):
        parse_prompt("a small red plain circle on a gray background, by day")
    with pytest.raises(ValueError, match="impossible scene: two objects at position 'center'"):
        parse_prompt("a small red plain circle at the center and a small blue plain cross at the center "
                     "on a gray background, by day")


def test_read_positions__where_objects_are_and_empty_on_a_blank_image():
    from toyworld.oracle import read_positions

    scene = Scene((Obj("cross", "red", "top right", "small"), Obj("circle", "blue", "bottom left", "big")))
    assert read_positions(render(scene).image) == ["top right", "bottom left"]
    assert read_positions(np.full((64, 64, 3), 125, np.uint8)) == []
