import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def toy_pipe():
    """The bundled toy model, loaded once per test session (float32, CPU)."""
    from activations.pipeline import load_pipeline

    pipe = load_pipeline("toy", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def random_toy_pipe():
    """The toy architecture with random weights: fast to build, no files needed."""
    from toyworld.model import build_pipeline

    return build_pipeline(seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
