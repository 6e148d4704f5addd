"""The errors a newcomer meets end in one sentence saying what to do, never a stack trace."""

from __future__ import annotations

from pathlib import Path

import psutil
import yaml

from helpers import hilomoe

REPO = Path(__file__).resolve().parents[1]


def one_sentence(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("hilomoe: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def test_no_ray_cluster_at_ray_address(tmp_path):
    res = hilomoe("study", "run", str(REPO / "studies" / "smoke.yaml"), "--out", str(tmp_path / "s"),
                  check=False, env={"RAY_ADDRESS": "127.0.0.1:1",
                                    "HILOMOE_CACHE": str(tmp_path / "cache"),
                                    "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert res.returncode == 2
    msg = one_sentence(res.stderr)
    assert "cannot reach a Ray cluster at RAY_ADDRESS='127.0.0.1:1'" in msg
    assert "unset it to use a local Ray" in msg


def test_a_dataset_path_that_is_not_a_dataset(tmp_path):
    study = yaml.safe_load((REPO / "studies" / "smoke.yaml").read_text())
    study["train"]["data"] = {"path": str(tmp_path / "nowhere")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    res = hilomoe("study", "run", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "s"),
                  check=False)
    assert res.returncode == 2
    assert "nowhere: no such dataset directory" in one_sentence(res.stderr)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_out_of_memory_on_a_too_large_batch(tmp_path):
    """A 45k-row batch through a layer so wide that its activation needs three times this
    machine's memory: refused by the allocator at once, and explained."""
    width = 3 * psutil.virtual_memory().total // (45000 * 4)
    cfg = {"data": {"synth": {"rows": 60000}},
           "model": {"embedding_dim": 4, "backbone": {"mlp": [width], "cross_layers": 0},
                     "moe": {"variant": "dense"}},
           "stages": {"base": {"epochs": 1, "batch_size": 45000}}}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(cfg))
    res = hilomoe("train", str(tmp_path / "big.yaml"), "--local", check=False)
    assert res.returncode == 2
    msg = one_sentence(res.stderr)
    assert "out of memory" in msg and "stages.<stage>.batch_size" in msg
