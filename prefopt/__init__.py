"""prefopt: offline preference optimization for causal language models.

from prefopt import train, TrainConfig
result = train(TrainConfig(loss="dpo", model="smollm2-135m-instruct", data="data_samples/standard.jsonl"))
"""

import logging

__version__ = "0.1.0"


def _not_the_kernels_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# transformers' Trainer imports peft, and peft imports bitsandbytes unconditionally, so every run
# imports bitsandbytes, which on AVX512-BF16 CPUs logs that the optional `kernels` package is
# missing. That kernel only serves bitsandbytes' packed CPU layout, which prefopt turns off
# (prefopt.models.loading.keep_4bit_layers_unpacked): nothing to act on, so only that line is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_note)


def _not_the_cpu_accelerator_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


# transformers imports DeepSpeed whenever it is installed, and on a machine without a GPU DeepSpeed
# warns that it picked its CPU accelerator: on every run, DeepSpeed or not. The CPU is what was asked.
logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_accelerator_note)

__all__ = ["TrainConfig", "TrainResult", "train", "__version__"]


def __getattr__(name):
    # Lazy: `import prefopt.losses` must not pull in transformers.
    if name == "TrainConfig":
        from prefopt.config import TrainConfig

        return TrainConfig
    if name in ("train", "TrainResult"):
        from prefopt.training import run

        return getattr(run, name)
    raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
