"""The errors a newcomer meets end in one sentence saying what to do, never a stack trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from helpers import handwritten, hilomoe, with_value

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
    assert "calibrated in" not in res.stderr  # said at once, not after the plan's calibration


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


def _train_on_an_id_outside_its_vocabulary(tmp_path, *flags: str) -> None:
    """`hilomoe train` on a hand-written Parquet dataset whose train split holds an id one past
    its field's vocabulary stops at the reader, in one sentence naming the shard, the field,
    the value and the ids allowed."""
    ds = handwritten(tmp_path / "ds", cat=with_value((200, 3), (150, 1), 50, np.int64))
    cfg = {"data": {"path": str(ds)},
           "model": {"embedding_dim": 4, "backbone": {"mlp": [8], "cross_layers": 0},
                     "moe": {"variant": "dense"}},
           "stages": {"base": {"epochs": 1, "batch_size": 64}},
           "ray": {"workers": 1, "max_failures": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = hilomoe("train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), *flags,
                  check=False)
    assert res.returncode == 2
    assert one_sentence(res.stderr) == (
        f"hilomoe: error: {ds}/train/part-00000.parquet: categorical field C1 holds id 50, but "
        f"its ids must lie in 0..49 (vocab_size 50 in dataset.json).")


def test_an_id_outside_its_vocabulary_stops_a_local_run(tmp_path):
    _train_on_an_id_outside_its_vocabulary(tmp_path, "--local")


@pytest.mark.slow
def test_an_id_outside_its_vocabulary_found_in_a_ray_read_task(tmp_path):
    """The same refusal raised in a Ray Data read task, behind a Ray Train worker: it reaches
    the user as the same one sentence, not Ray's traceback nor its retry advice."""
    _train_on_an_id_outside_its_vocabulary(tmp_path)


def test_a_sentence_raised_in_a_ray_task_stays_one_sentence():
    """Ray Data appends its retry advice to the args of an error raised in a read task, and Ray
    wraps it in a RayTaskError whose text is a traceback; what the user reads is the original
    sentence."""
    import pickle

    from ray.exceptions import RayTaskError

    from hilomoe.errors import DatasetError, HilomoeError, hilomoe_cause

    sentence = "/d/train/part-00000.parquet: categorical field C1 holds id 50, but ..."
    err = DatasetError(sentence)
    err.args = (f"{err.args[0]}\nFailed to apply UDF transform after 1/1 attempts.",)
    err = pickle.loads(pickle.dumps(err))  # as it crosses from the read task's process
    assert str(err) == sentence
    wrapped = RayTaskError("read", "Traceback (most recent call last): ...", err)
    wrapped = wrapped.as_instanceof_cause()
    assert isinstance(wrapped, HilomoeError) and str(wrapped) != sentence
    try:
        try:
            raise wrapped
        except Exception as inner:
            raise RuntimeError("Ray Train: a worker failed") from inner
    except RuntimeError as outer:
        assert str(hilomoe_cause(outer)) == sentence
    assert hilomoe_cause(ValueError("unrelated")) is None
