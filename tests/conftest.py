"""Shared fixtures: a tiny offline SD model and a small synthetic data set, built once per session."""
from __future__ import annotations

import os

# Set before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The test models are tiny: one thread is faster, and OpenMP threads spinning against the other
# processes of a 2-core machine (subprocess runs, torchrun ranks) slow steps down a hundredfold.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x diffusers folder (seed 0, epsilon prediction). Treat it as read-only."""
    from hcp_core.demo.model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo_model"), seed=0)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 captioned images of mixed aspect ratios, masks in att_mask/. Treat it as read-only."""
    from hcp_core.demo.dataset import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo_data"), n_images=12, seed=0)


@pytest.fixture(scope="session")
def sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL diffusers folder (seed 0), what ``hcp demo --sdxl`` writes. Treat it as read-only."""
    from hcp_core.demo.sdxl import build_demo_sdxl_model

    return build_demo_sdxl_model(tmp_path_factory.mktemp("sdxl_model"), seed=0)


@pytest.fixture(scope="session")
def flux_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev-style diffusers folder (seed 0, guidance embedded). Treat it as read-only."""
    from hcp_core.demo.flux import build_demo_flux_model

    return build_demo_flux_model(tmp_path_factory.mktemp("flux_model"), seed=0)


@pytest.fixture(scope="session")
def sd3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3.5-style diffusers folder (seed 0). Treat it as read-only."""
    from hcp_core.demo.sd3 import build_demo_sd3_model

    return build_demo_sd3_model(tmp_path_factory.mktemp("sd3_model"), seed=0)
