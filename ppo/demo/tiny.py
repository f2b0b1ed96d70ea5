"""A tiny Qwen3-architecture model and a word-level tokenizer, built locally with no download.

Both are ordinary Hugging Face objects: saved with `save_pretrained`, they load back through
`AutoModelForCausalLM` / `AutoModelForSequenceClassification` / `AutoTokenizer` with no import of
`ppo`. The demo, the tests and the benchmarks build their models here, and a user can start a
from-scratch model of any size the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]

# A minimal chat template in Jinja, so that conversational data paths can be tested offline.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% if m['role'] == 'assistant' %}"
    "<eos> {% endif %}{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of a from-scratch Qwen3 model. head_dim is fixed so that heads = hidden / head_dim."""

    hidden_size: int = 64
    num_layers: int = 2
    head_dim: int = 32
    intermediate_multiple: int = 3
    max_position_embeddings: int = 512


def build_tokenizer(words: list[str], chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ids 0..2 are <pad>, <eos>, <unk>, then `words` in order.

    Left padding, as batched generation needs; pad and EOS are distinct tokens.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen3_config(vocab_size: int, spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast | None = None) -> Qwen3Config:
    heads = max(1, spec.hidden_size // spec.head_dim)
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_multiple * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 1,
        bos_token_id=None,
    )


def build_policy(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM sized for `tokenizer` (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(len(tokenizer), spec, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_reward_model(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0) -> Qwen3ForSequenceClassification:
    """A randomly initialised Qwen3 sequence classifier with one label (a reward or value model)."""
    torch.manual_seed(seed)
    config = qwen3_config(len(tokenizer), spec, tokenizer)
    config.num_labels = 1
    return Qwen3ForSequenceClassification(config).eval()
