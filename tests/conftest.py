"""Shared, expensive fixtures: one tiny model for the whole session, one local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# DeepSpeed must pick its CPU accelerator before it is first imported anywhere.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items):
    # Tests are marked by folder so that no test can be left out of both CI selections. The
    # folder is read relative to tests/: a checkout under e.g. /home/unit/ must not mark all.
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            folder = Path(str(item.fspath)).resolve().relative_to(tests_dir).parts[0]
        except ValueError:  # not under tests/
            continue
        if folder == "unit":
            item.add_marker(pytest.mark.unit)
        elif folder == "integration":
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + tokenizer in Hugging Face format, built once per test session."""
    from prefopt.config import TinyModelConfig
    from prefopt.models import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-model"), TinyModelConfig())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every integration test that drives workers in-process."""
    import ray

    from prefopt.cluster.ray_setup import connect
    from prefopt.config import ClusterConfig, RoleConfig

    connect(ClusterConfig(), [RoleConfig(num_workers=2), RoleConfig(num_workers=1)])
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server on 127.0.0.1 (tests/s3_server.py), this process pointed at it.
    Processes started after it (CLI runs, a local Ray started by them) inherit the variables."""
    import s3_server

    server = s3_server.start()
    previous = s3_server.use(server)
    yield server
    s3_server.restore(previous)
    server.stop()
