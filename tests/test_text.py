"""Prompt text has one home: activations.text.encode_prompts is the only caller of the pipeline's
encode_prompt, and every client (evaluation, HRV words, head swaps, the explorer) reads its output."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from activations.text import encode_prompts
from common.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "activations", "sae", "analysis", "steering", "diffatlas")
PROMPTS = ["a red circle", "a blue square", ""]


def test_encode_prompts__is_the_only_caller_of_the_pipelines_encode_prompt():
    callers = []
    for package in PACKAGES:
        for source in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text(), str(source))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "encode_prompt":
                    callers.append(f"{source.relative_to(ROOT)}:{node.lineno}")
    assert [c.split(":")[0] for c in callers] == ["activations/text.py"], callers


def test_encode_prompts__are_the_pipelines_conditional_embeddings_whatever_the_batch(random_toy_pipe):
    pipe = random_toy_pipe
    direct = pipe.encode_prompt(prompt=PROMPTS, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    ours = encode_prompts(pipe, PROMPTS)
    assert ours.shape == (3, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    assert torch.equal(ours, direct)
    assert torch.equal(encode_prompts(pipe, PROMPTS, batch_size=2), direct)
    assert torch.equal(encode_prompts(pipe, PROMPTS[1:2])[0], direct[1])


def test_encode_prompts__refuses_a_bad_batch_size_and_no_prompts(random_toy_pipe):
    with pytest.raises(UsageError, match=r"batch_size must be a positive integer or None, got 0"):
        encode_prompts(random_toy_pipe, PROMPTS, batch_size=0)
    with pytest.raises(UsageError, match="no prompts"):
        encode_prompts(random_toy_pipe, [])


def test_encode_prompt_head_swap__works_on_sdxl_whose_encode_prompt_takes_prompt_2_second():
    # the head swap used to call encode_prompt positionally, passing the device as SDXL's prompt_2
    from activations.edits import SwapKV
    from activations.models import build_tiny_pipeline
    from steering.heads import EncodePrompt

    pipe = build_tiny_pipeline("sdxl")
    swaps = EncodePrompt(prompt="a red cat", heads=[0]).expand(pipe, ["a blue dog"])
    assert swaps and all(isinstance(s, SwapKV) for s in swaps)
    assert torch.equal(swaps[0].encoder_hidden_states, encode_prompts(pipe, ["a red cat"])[0])
    assert swaps[0].encoder_hidden_states.shape == (16, 64)  # SDXL: both encoders' states side by side
