"""The toy world's tokenizer: one token per word of its vocabulary, in CLIP's conventions.

Each word is one token, so every token the text encoder sees is a whole concept word (the HRV
method averages a word's maps over its tokens; here that average is over exactly one).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from activations.tokenizer import word_tokenizer
from toyworld.prompts import WORDS

MAX_LENGTH = 40  # the longest prompt the grammar writes is 27 words and commas, plus start and end


def build_tokenizer(max_length: int = MAX_LENGTH, words=WORDS) -> PreTrainedTokenizerFast:
    """One token per word of ``words`` (the toy world's by default), built in memory."""
    return word_tokenizer(words, max_length)
