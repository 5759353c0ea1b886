"""A word-level tokenizer over the toy world's vocabulary, in CLIP's conventions.

Each word is one token, so every token the text encoder sees is a whole concept word (the HRV
method averages a word's maps over its tokens; here that average is over exactly one). Like SD
1.x's CLIP tokenizer it wraps a prompt in start/end tokens and pads with the end token.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from toyworld.prompts import WORDS

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_LENGTH = 40  # the longest prompt the grammar writes is 27 words and commas, plus start and end


def build_tokenizer(max_length: int = MAX_LENGTH, words=WORDS) -> PreTrainedTokenizerFast:
    """One token per word of ``words`` (the toy world's by default), built in memory."""
    vocab = {token: i for i, token in enumerate((BOS, EOS, UNK) + tuple(dict.fromkeys(words)))}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "background," into "background" ","
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        model_max_length=max_length,
    )
