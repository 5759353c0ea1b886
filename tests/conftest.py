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


@pytest.fixture(scope="session")
def feature_analysis(tmp_path_factory, random_toy_pipe):
    """A block-site SAE of the toy (random weights) and the folder `diffatlas analyze features`
    writes for it over a 4-image toyworld store, with an HRV: every feature analysed (all shown),
    so each has a density, a top HRV concept and a toy ground-truth label. Returns
    (sae folder, analysis folder, report dict)."""
    from activations.config import HarvestConfig, PromptSource
    from activations.harvest import harvest
    from activations.sites import head_table
    from activations.store import ActivationStore
    from analysis.concepts import ConceptList
    from analysis.feature_report import FeaturesConfig, build_report
    from analysis.hrv import HRV
    from sae.config import SparseCoderConfig
    from sae.registry import get_architecture

    site = "up_blocks.2.attentions.0"
    root = tmp_path_factory.mktemp("feature_analysis")
    random_toy_pipe.set_progress_bar_config(disable=True)
    harvest(HarvestConfig(model="toy", out=str(root / "store"), sites=[site], seed=0,
                          prompts=PromptSource(kind="toyworld", num_prompts=4), num_inference_steps=3, guidance_scale=4.0,
                          timesteps="all", branch="cond", batch_size=4, progress=False), pipe=random_toy_pipe)
    torch.manual_seed(0)
    sae = get_architecture("topk")(SparseCoderConfig(num_latents=16, k=4), ActivationStore(root / "store").site(site).width)
    sae.placement.site, sae.placement.stage, sae.placement.model = site, "block", "toy"
    sae.save_pretrained(root / "sae")
    table = head_table(random_toy_pipe.unet)
    votes = torch.zeros(2, 2, len(table), dtype=torch.long)
    votes[:, 0, ::2] = 5  # "color" wins the even heads, "shape" the odd ones: features differ in their concept
    votes[:, 1, 1::2] = 3
    HRV(ConceptList(("color", "shape"), (("red",), ("circle",))), votes, table, [999, 500]).save(root / "hrv")
    cfg = FeaturesConfig(sae=str(root / "sae"), store=str(root / "store"), hrv=str(root / "hrv"), out=str(root / "analysis"),
                         features=16, examples=1, images=1, wandb=False, html=False, progress=False)
    return root / "sae", root / "analysis", build_report(cfg, pipe=random_toy_pipe)


@pytest.fixture(params=["sd3", "flux"])
def mmdit(request):
    """(family, a tiny transformer of it, its output on the shared inputs: tests/mmdit_helpers.py)."""
    from activations.models import build_tiny_transformer
    from mmdit_helpers import forward

    model = build_tiny_transformer(request.param)
    return request.param, model, forward(model, request.param)
