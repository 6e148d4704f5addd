"""Secure by default: what hilomoe reads from places other users can write.

Checkpoints, the stage-1 cache and the trial cache live on shared volumes; a file planted there
must not run code when hilomoe loads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hilomoe.errors import HilomoeError
from hilomoe.session import STATE_FILE, read_state
from hilomoe.study.cache import RECORDS, WEIGHTS, Stage1Cache, TrialCache


class Canary:
    """Unpickling it would create `path` (what a planted checkpoint's payload could do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(2)}, "payload": Canary(marker)}, path)


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "checkpoint"
    plant(run / STATE_FILE, marker)
    with pytest.raises(HilomoeError) as err:
        read_state(run)
    assert not marker.exists()
    assert str(run / STATE_FILE) in str(err.value) and "refused" in str(err.value)
    assert "\n" not in str(err.value)
    # a rank's shard file next to a clean state is refused the same way
    torch.save({"model": {"w": torch.zeros(2)}}, run / STATE_FILE)
    plant(run / "state.rank1.pt", marker)
    with pytest.raises(HilomoeError, match="state.rank1.pt: refused"):
        read_state(run)
    assert not marker.exists()
    # a checkpoint of tensors and plain data loads
    (run / "state.rank1.pt").unlink()
    state, summary = read_state(run)
    assert torch.equal(state["model"]["w"], torch.zeros(2)) and summary is None


def test_planted_cache_entries_are_misses_that_run_nothing(tmp_path):
    """A cache entry is disposable: a planted one is refused like a checkpoint, but the trial
    goes on (it trains what the entry claimed to hold) with one warning naming the file, and
    the entry is removed."""
    marker = tmp_path / "pwned"
    stage1 = Stage1Cache(tmp_path / "stage1")
    plant(stage1.path("k") / WEIGHTS, marker)
    (stage1.path("k") / RECORDS).write_text('{"history": [], "seconds": 1.0}')
    with pytest.warns(RuntimeWarning, match=f"{stage1.path('k')}: unreadable .*refused"):
        assert stage1.get("k") is None
    trials = TrialCache(tmp_path / "trials")
    plant(trials.path("k") / TrialCache.STATE, marker)
    (trials.path("k") / TrialCache.SUMMARY).write_text("{}")
    with pytest.warns(RuntimeWarning, match="refused to load"):
        assert trials.get("k") is None
    assert not marker.exists()
    assert not stage1.path("k").exists() and not trials.path("k").exists()


# ---------------------------------------------------------------------------------------------
# names used as paths


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "a/b", "..", "a\\b", ""])
def test_a_study_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    from hilomoe.config import ConfigError
    from hilomoe.study.spec import load_study

    study = tmp_path / "study.yaml"
    study.write_text(f"name: {name!r}\ntrain: {{}}\n")
    with pytest.raises(ConfigError) as err:
        load_study(study)
    assert "\n" not in str(err.value) and f"{study}: name:" in str(err.value)


def test_the_command_line_refuses_a_study_name_in_one_sentence(tmp_path):
    from helpers import hilomoe

    study = tmp_path / "study.yaml"
    study.write_text("name: ../evil\ntrain: {}\n")
    proc = hilomoe("study", "run", str(study), check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "'../evil' is used as a file or directory name" in proc.stderr
    assert not (tmp_path.parent / "evil").exists() and not Path("runs/../evil").exists()


def test_a_report_target_that_would_escape_reports_is_refused(tmp_path):
    from helpers import hilomoe

    for target in ("../x", "/abs/x"):
        proc = hilomoe("study", "report", target, check=False,
                       env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
        assert proc.returncode != 0 and "give --out DIR" in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists() and not Path("/abs/x").exists()


@pytest.mark.parametrize("bad", ["../../outside.parquet", "/etc/passwd", "sub/part.parquet"])
def test_a_dataset_listing_a_shard_outside_its_split_is_refused(tmp_path, bad):
    from hilomoe.config import PlantedData
    from hilomoe.data.dataset import META_FILE, open_dataset
    from hilomoe.data.synth import write_synth
    from hilomoe.errors import DatasetError

    import json

    ds = tmp_path / "ds"
    write_synth(PlantedData(rows=2_000, categorical_fields=2, vocab_size=5, numeric_fields=1),
                ds)
    meta = json.loads((ds / META_FILE).read_text())
    meta["splits"]["train"]["files"][0] = bad
    (ds / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as err:
        open_dataset(ds)
    assert str(ds / META_FILE) in str(err.value) and "splits.train.files" in str(err.value)
    assert "\n" not in str(err.value)
