"""The tiny pipeline and its precomputed latents, built once per test session (tiny_pipeline.py)."""
import pytest

from tests.integrations.tiny_pipeline import precompute_config, write_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def tiny_latents(tiny_pipeline, tmp_path_factory):
    from dsv.finetune.precompute import precompute

    out = tmp_path_factory.mktemp("latents")
    precompute(precompute_config(tiny_pipeline, out))
    return out
