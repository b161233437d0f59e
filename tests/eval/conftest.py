# The tiny model and the per-test reference cache of tests/train.
from train.conftest import isolated_cache, tiny_model_dir  # noqa: F401
