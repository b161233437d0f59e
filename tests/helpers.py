"""Offline fixtures shared by the tests: a byte-level tokenizer with a chat template, tiny Llamas."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Four standard-format pairs shared by the tests that compare against TRL.
PAIRS = [
    {"prompt": "Q: what is 2+2?", "chosen": " It is 4.", "rejected": " five"},
    {"prompt": "Say hi.", "chosen": " Hello there!", "rejected": " no"},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Berlin, I think"},
    {"prompt": "Be kind.", "chosen": " Of course.", "rejected": " Why?"},
]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (ByteLevel alphabet, no merges) plus ChatML specials: any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# Every Linear of the tiny Llama has in_features a multiple of 64 (bitsandbytes' 4-bit quantisation
# block) and out_features a multiple of 32: the shapes that all of bitsandbytes' CPU paths accept,
# including the packed AVX512-BF16 layout it switches to in no-grad eval forwards on CPUs that
# have that instruction (q/o 64->64, k/v 64->32, gate/up 64->128, down 128->64). Smaller shapes
# made the QLoRA tests pass or crash depending on the machine's CPU.
TINY_HIDDEN, TINY_INTERMEDIATE = 64, 128


def tiny_llama(
    seed: int = 0, vocab_size: int = 259, hidden_size: int = TINY_HIDDEN, intermediate_size: int = TINY_INTERMEDIATE
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(folder, seed: int = 0, **shape) -> str:
    """A tiny random Llama with the byte tokenizer, saved as a local model folder (`shape`: tiny_llama's sizes)."""
    tiny_llama(seed, **shape).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)
