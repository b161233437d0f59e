"""Offline fixtures shared by the tests: a byte-level tokenizer with a chat template, tiny Llamas."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefopt.bench.tiny import CHAT_TEMPLATE, SPECIALS, byte_tokenizer  # noqa: F401  (re-exported for the tests)

# Four standard-format pairs shared by the tests that compare against TRL.
PAIRS = [
    {"prompt": "Q: what is 2+2?", "chosen": " It is 4.", "rejected": " five"},
    {"prompt": "Say hi.", "chosen": " Hello there!", "rejected": " no"},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Berlin, I think"},
    {"prompt": "Be kind.", "chosen": " Of course.", "rejected": " Why?"},
]


# float32 rounding, the yardstick for comparing two computations of the same value (prefopt's vs
# TRL's, an optimised path vs the plain one). They differ only by rounding, which depends on the
# order of summation: kernel blocking, batch shape, the CPU's vector width. So an absolute tolerance
# that passes on one CPU can fail on another (1.4e-6 against 1e-6 was seen). Rounding errors of a
# reduction over n terms add up like a random walk, ~sqrt(n) * eps * the magnitude of the terms;
# the longest reduction behind these tests is the tiny model's 259-entry log-softmax, so the
# tolerance is sqrt(256) * eps = 1.9e-6 relative to the magnitude. A wrong formula (a missing
# beta, a swapped side, a mean for a sum) is off by a large fraction of the value itself.
F32_EPS = torch.finfo(torch.float32).eps  # 2**-23
F32_TERMS = 256


def f32_error(actual, expected, scale=None, terms: int = F32_TERMS) -> float:
    """max |actual - expected| in units of float32 rounding: sqrt(terms) * eps * magnitude.

    The magnitude is `scale` where given (the size of the operands, when the value is a small
    difference of large sums, such as a log-ratio of summed log-probs, which keeps only the sums'
    absolute precision), else the largest |expected| (one tensor's elements come out of the same
    reductions). Below 1 is "equal up to float32 rounding"."""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    magnitude = expected.abs().max().item() if scale is None else float(scale)
    return (actual - expected).abs().max().item() / (terms**0.5 * F32_EPS * max(magnitude, 1e-30))


def assert_f32_close(actual, expected, scale=None, what: str = "", terms: int = F32_TERMS) -> None:
    error = f32_error(actual, expected, scale, terms)
    assert error <= 1.0, f"{what}: {actual} vs {expected} differ by {error:.2f} x the float32 tolerance"


# A gradient passes through more reductions than a forward value: back through the 259-way
# vocabulary, the 128- and 64-wide layers and attention over the positions, then summed over every
# position of the batch (8 x 35 in the TRL comparison): about a thousand terms. Compared as a whole
# tensor, relative to its norm, since single entries can be sums that cancel to near zero.
F32_GRAD_TERMS = 1024


def assert_f32_grad_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    error = (actual - expected).double().norm().item() / (expected.double().norm().item() or 1e-30)
    units = error / (F32_GRAD_TERMS**0.5 * F32_EPS)
    assert units <= 1.0, f"{what}: relative difference {error:.2e} is {units:.2f} x the float32 tolerance"


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


SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


def train_argv(model_dir, output_dir, data: str = "standard.jsonl", *extra) -> list[str]:
    """`prefopt train ...` arguments for a run on a sample file."""
    return ["train", "--model", str(model_dir), "--data", str(SAMPLES / data), "--output-dir", str(output_dir), *extra]


def read_metrics(output_dir) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and the chunk's CRC."""
    import zlib

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    crc = struct.unpack(">I", data[16 + length : 20 + length])[0]
    assert crc == zlib.crc32(data[12 : 16 + length]), "IHDR CRC"
    assert data[-12:-8] == b"\0\0\0\0" and data[-8:-4] == b"IEND", "no IEND chunk at the end"
    return struct.unpack(">II", data[16:24])


def save_offline_hub_dataset(datasets_cache: Path, repo_id: str, splits: dict[str, Path]) -> None:
    """Put `repo_id` in a local Hugging Face datasets cache as `load_dataset` leaves it after a
    download (DATASETS_CACHE/org___name/default/0.0.0/HASH/), so that it loads offline: datasets'
    json builder prepares the files, then its folders take the names of a hub download."""
    from datasets.packaged_modules.json.json import Json

    name = repo_id.split("/")[-1]
    builder = Json(
        cache_dir=str(datasets_cache),
        dataset_name=name,
        config_name="default",
        data_files={split: str(path) for split, path in splits.items()},
        hash="0123456789abcdef",
    )
    builder.download_and_prepare()
    prepared = datasets_cache / name
    target = datasets_cache / repo_id.replace("/", "___")
    prepared.rename(target)
    for config in target.glob("default-*"):  # the json builder names its config after the files
        config.rename(target / "default")
