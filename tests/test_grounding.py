import numpy as np
import pytest
import torch

from toyworld.grounding import grounding_loss, object_masks, record_cross_attention, token_owners, word_owners
from toyworld.prompts import scene_to_prompt, split_words
from toyworld.render import render
from toyworld.scene import Obj, Scene, sample_scene
from toyworld.tokenizer import build_tokenizer
from toyworld.vocab import OBJECT_ATTRIBUTES


def _two_objects() -> Scene:
    return Scene(
        objects=(Obj("circle", "red", "top left", "small", "plain"), Obj("cross", "blue", "bottom right", "big", "striped")),
        background="gray", style="night",
    )


def test_word_owners__every_attribute_word_points_at_its_own_object():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng, num_objects=2)
        prompt = scene_to_prompt(scene, rng)
        words, owners = split_words(prompt), word_owners(prompt)
        for index, obj in enumerate(scene.objects):
            described = {w for w, o in zip(words, owners) if o == index}
            expected = {w for name in OBJECT_ATTRIBUTES for w in getattr(obj, name).split()}
            assert described == expected, prompt
        # background and style words are never grounded
        assert all(o == -1 for w, o in zip(words, owners) if w in (scene.background, "background", "night", "day"))


def test_token_owners__line_up_with_the_tokenizer():
    tokenizer = build_tokenizer()
    prompt = "on a gray background, a small red plain circle at the top left, at night"
    ids = tokenizer(prompt, padding="max_length").input_ids
    owners = token_owners(prompt, len(ids))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    grounded = [t for t, o in zip(tokens, owners.tolist()) if o == 0]
    assert grounded == ["small", "red", "plain", "circle", "top", "left"]
    assert owners[0] == -1 and (owners[len(split_words(prompt)) + 1 :] == -1).all()


def test_grounding_loss__zero_inside_the_object_and_high_outside():
    scene = _two_objects()
    masks = object_masks(render(scene), 16)[None]  # [1, 2, 16, 16]
    owners = token_owners("a small red plain circle at the top left", 8)[None]
    inside = masks[0, 0].flatten() > 0
    on_object = torch.zeros(1, 256, 8)
    on_object[0, inside, :] = 1.0 / inside.sum()  # every token's mass sits on object 0's patches
    on_other = torch.zeros(1, 256, 8)
    other = masks[0, 1].flatten() > 0
    on_other[0, other, :] = 1.0 / other.sum()
    # an 8x8 map of the same layout, pooled from the 16x16 one, is scored on the pooled mask
    coarse = torch.nn.functional.avg_pool2d(on_object.transpose(1, 2).reshape(1, 8, 16, 16), 2).reshape(1, 8, 64).transpose(1, 2)
    assert grounding_loss([on_object], owners, masks) == pytest.approx(0.0, abs=1e-6)
    assert grounding_loss([coarse], owners, masks) == pytest.approx(0.0, abs=1e-6)
    assert grounding_loss([on_other], owners, masks) == pytest.approx(1.0, abs=1e-6)


def test_record_cross_attention__same_output_one_map_per_module_and_processors_restored(random_toy_pipe):
    unet = random_toy_pipe.unet
    torch.manual_seed(0)
    latents, text = torch.randn(2, unet.config.in_channels, 16, 16), torch.randn(2, 40, unet.config.cross_attention_dim)
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    modules = [name for name in before if name.endswith("attn2.processor")]
    reference = unet(latents, 500, text).sample
    with record_cross_attention(unet) as store:
        recorded = unet(latents, 500, text).sample
    torch.testing.assert_close(recorded, reference, atol=1e-5, rtol=1e-4)
    assert len(store) == len(modules)
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in store)
    assert all(m.requires_grad for m in store)  # the grounding loss trains through them
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before


def test_word_owners__captions_that_leave_things_unsaid_ground_what_they_say():
    # the generic noun stands for an unsaid shape; a short caption's bare adjectives are its object
    assert word_owners("a shape at the top left and a small circle") == [-1, 0, -1, -1, 0, 0, -1, -1, 1, 1]
    assert word_owners("big red, at night") == [0, 0, -1, -1, -1]
    assert word_owners("on a gray background, by day") == [-1] * 7
