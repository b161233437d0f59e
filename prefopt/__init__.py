"""prefopt: offline preference optimization for causal language models.

from prefopt import train, TrainConfig
result = train(TrainConfig(loss="dpo", model="smollm2-135m-instruct", data="data_samples/standard.jsonl"))
"""

__version__ = "0.1.0"

__all__ = ["TrainConfig", "TrainResult", "train", "__version__"]


def __getattr__(name):
    # Lazy: `import prefopt.losses` must not pull in transformers.
    if name == "TrainConfig":
        from prefopt.config import TrainConfig

        return TrainConfig
    if name in ("train", "TrainResult"):
        from prefopt import run

        return getattr(run, name)
    raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
