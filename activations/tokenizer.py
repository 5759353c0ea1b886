"""A word-level tokenizer built in memory, in CLIP's conventions (no files, no network).

Each word is one token, wrapped in start/end tokens and padded with the end token like SD 1.x's
CLIP tokenizer. The tiny test pipelines use it, and the toy world builds its own vocabulary's.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"


def word_tokenizer(words, max_length: int) -> PreTrainedTokenizerFast:
    """One token per word of ``words``; other words become the unknown token."""
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
