"""Shared fixtures. The core tests need no Ray; Ray-backed tests share one local instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import kill_tree

from hilomoe.config import MoEConfig, ModelConfig, Variant
from hilomoe.schema import FeatureSchema

VARIANTS = [v for v in Variant]
MOE_VARIANTS = [v for v in Variant if v is not Variant.DENSE]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def schema() -> FeatureSchema:
    return FeatureSchema(vocab_sizes=(30, 40, 50, 20), numeric=2)


def model_config(variant: Variant = Variant.HILOMOE, **moe) -> ModelConfig:
    defaults = dict(variant=variant, levels=3, experts=4, top_k=2)
    return ModelConfig(embedding_dim=4, backbone={"mlp": [16, 8], "cross_layers": 2},
                       moe=MoEConfig(**{**defaults, **moe}))


def random_inputs(schema: FeatureSchema, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, v, (batch,), generator=g) for v in schema.vocab_sizes], 1)
    num = torch.randn(batch, schema.numeric, generator=g)
    return cat, num


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session, kept on loopback, stopped by its handle."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # stay on 127.0.0.1
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def loopback_cluster(monkeypatch):
    """infra/local_cluster.py: a head with its job server (1 CPU) and one worker node (1 CPU),
    on 127.0.0.1, with a token of its own; stopped through its PID only. SIGUSR1 to `pid`
    removes the worker node (a node-failure drill)."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, str(REPO / "infra" / "local_cluster.py"),
                             "--workers", "1", "--cpus", "1", "--head-cpus", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line, "the local cluster did not start"
        info = json.loads(line)
        info["proc"] = proc
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
