"""The embedding backends: the same function, the same updates, the same saved state.

torch (sparse `nn.Embedding`, sparse torch optimisers), TorchRec (FBGEMM's fused kernels) and
the dense reference (`nn.Embedding` with dense gradients) must agree: equal lookups for equal
weights, equal rows after the same optimiser step on the same batch, and rows a batch did not
touch left bit-for-bit as they were. The sharded TorchRec tables (two gloo ranks on loopback)
must look up what one process looks up, each rank holding about half of the bytes.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from conftest import model_config, random_inputs
from hilomoe.config import EmbeddingConfig
from hilomoe.engine.optimizers import make_table_optimizer
from hilomoe.model.ctr import CTRModel
from hilomoe.model.embedding import (TableOptimizer, TorchEmbedding, TorchRecEmbedding,
                                     table_placement)
from hilomoe.schema import FeatureSchema
from hilomoe.session import read_state, write_files

SCHEMA = FeatureSchema(vocab_sizes=(50, 7, 300, 20), numeric=2)


def backends(dim: int = 8, seed: int = 0):
    """The dense reference, the sparse torch table and TorchRec, with the same weights."""
    dense = TorchEmbedding(SCHEMA, dim, seed, sparse=False)
    sparse = TorchEmbedding(SCHEMA, dim, seed)
    torchrec = TorchRecEmbedding(SCHEMA, dim, seed)
    return {"dense": dense, "torch": sparse, "torchrec": torchrec}


def ids(batch: int, seed: int = 1, high: int | None = None) -> torch.Tensor:
    """Ids of the batch; `high` keeps them below it (so many rows stay untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, min(v, high or v), (batch,), generator=g)
                        for v in SCHEMA.vocab_sizes], 1)


@pytest.mark.parametrize("dim", [8, 6])  # 6: FBGEMM stores 8 columns, the lookup returns 6
def test_backends_look_up_the_same_vectors_from_the_same_weights(dim):
    tables = backends(dim)
    cat, num = ids(64), torch.randn(64, SCHEMA.numeric)
    # the same seed draws the same tables in every backend ...
    ref = tables["dense"](cat, num)
    for name in ("torch", "torchrec"):
        assert torch.equal(tables[name](cat, num), ref), name
    # ... and the saved state has one layout: load any backend's weights into any other
    state = {k: v + 1.0 for k, v in tables["torchrec"].state_dict().items()}
    assert sorted(state) == sorted(tables["torch"].state_dict()) == \
        ["numeric"] + sorted(f"tables.{i}" for i in range(4))
    for emb in tables.values():
        emb.load_state_dict(state)
    outs = [emb(cat, num) for emb in tables.values()]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert torch.equal(outs[0][:, :dim], state["tables.0"][cat[:, 0]])


def test_whole_models_agree_across_backends(schema):
    """A CTR model is the same function with either backend once their states are equal."""
    cfg = model_config()
    a = CTRModel(schema, cfg.model_copy(update={"embedding": EmbeddingConfig(backend="torch")}))
    b = CTRModel(schema, cfg.model_copy(update={"embedding": EmbeddingConfig(backend="torchrec")}))
    b.load_state_dict(a.state_dict())
    cat, num = random_inputs(schema, 32)
    assert torch.equal(a(cat, num)[0], b(cat, num)[0])


def _step(emb, spec: TableOptimizer, cat, num, grad, steps: int = 1) -> None:
    """`steps` optimiser steps of the tables on the same batch with the same output gradient."""
    optimizer = make_table_optimizer(emb, spec)
    if isinstance(emb, TorchEmbedding) and not emb.sparse and spec.kind == "sgd":
        assert isinstance(optimizer, torch.optim.SGD)
    for _ in range(steps):
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        emb.numeric.grad = None
        out = emb(cat, num)
        out.backward(grad)
        if optimizer is not None:
            optimizer.step()


@pytest.mark.parametrize("kind, steps, backends_", [
    ("sgd", 1, ("dense", "torch", "torchrec")),
    ("rowwise_adagrad", 3, ("torch", "torchrec")),
    ("adagrad", 3, ("dense", "torch", "torchrec")),
])
def test_the_same_step_updates_the_same_rows_and_leaves_the_rest_untouched(kind, steps, backends_):
    tables = backends()
    before = {i: t.detach().clone() for i, t in tables["dense"].tables().items()}
    cat = ids(96, high=5)  # ids 0..4 of each field: most rows are untouched
    num = torch.randn(96, SCHEMA.numeric)
    grad = torch.randn(96, SCHEMA.num_fields * 8)
    spec = TableOptimizer(kind, 0.1)
    after = {}
    for name in backends_:
        _step(tables[name], spec, cat, num, grad, steps)
        after[name] = {i: t.detach().clone() for i, t in tables[name].tables().items()}
    for i, table in before.items():
        touched = torch.zeros(len(table), dtype=torch.bool)
        touched[cat[:, i].unique()] = True
        for name in backends_:
            # untouched rows: bit for bit; touched rows moved
            assert torch.equal(after[name][i][~touched], table[~touched]), (name, i)
            assert not torch.equal(after[name][i][touched], table[touched]), (name, i)
            # touched rows: the same values in every backend (summation order aside)
            torch.testing.assert_close(after[name][i], after[backends_[0]][i], rtol=1e-5,
                                       atol=1e-6)


def test_adam_on_touched_rows_and_frozen_tables():
    tables = backends()
    cat, num, grad = ids(32, high=3), torch.randn(32, 2), torch.randn(32, 6 * 8)
    before = tables["torch"].tables()[2].detach().clone()
    _step(tables["torch"], TableOptimizer("adam", 0.01), cat, num, grad, steps=2)
    after = tables["torch"].tables()[2]
    assert torch.equal(after[3:], before[3:]) and not torch.equal(after[:3], before[:3])
    # FBGEMM has no fused Adam on the CPU: one sentence says what to use instead
    with pytest.raises(Exception, match="no fused Adam on the CPU"):
        make_table_optimizer(tables["torchrec"], TableOptimizer("adam", 0.01))
    # frozen (stage 2): lookups carry no gradient, so nothing reaches the fused kernels
    emb = tables["torchrec"]
    frozen = {i: t.detach().clone() for i, t in emb.tables().items()}
    assert make_table_optimizer(emb, None) is None and not emb.trainable
    out = emb(cat, num)
    out.sum().backward()  # reaches the numeric vectors only
    assert emb.numeric.grad is not None
    assert all(torch.equal(emb.tables()[i], t) for i, t in frozen.items())


def test_fused_optimizer_state_survives_a_rebuild_and_a_state_round_trip():
    """A checkpoint keeps the fused row-wise state: restoring it and taking the same step gives
    the same rows as never stopping."""
    cat, num, grad = ids(64, high=10), torch.randn(64, 2), torch.randn(64, 6 * 8)
    spec = TableOptimizer("rowwise_adagrad", 0.1)
    a, b = TorchRecEmbedding(SCHEMA, 8), TorchRecEmbedding(SCHEMA, 8)
    _step(a, spec, cat, num, grad, steps=2)
    weights, moments = a.state_dict(), {k: v.clone() for k, v in a.optimizer_state().items()}
    assert moments and all(k.split(".")[1] == "momentum1" for k in moments)
    b.load_state_dict(weights)
    b.configure(spec)
    b.load_optimizer_state(moments)
    for emb in (a, b):  # one more step each, a without a rebuild, b restored
        out = emb(cat, num)
        out.backward(grad)
    for i in range(4):
        assert torch.equal(a.tables()[i], b.tables()[i])


# ----------------------------------------------------------------------------------------------
# sharded tables: two gloo ranks on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_rank(rank: int, world: int, port: int, out: dict, ckpt: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        emb = TorchRecEmbedding(SCHEMA, 8, seed=3, sharded=True)
        emb.configure(TableOptimizer("rowwise_adagrad", 0.1))
        # different batch counts per rank: the short one joins the other's lookups
        batches = [ids(16, seed=rank * 10 + k) for k in range(2 + rank)]
        results = [emb(b, torch.zeros(16, 2)).detach() for b in batches]
        if rank == 0:
            emb.join()
        out[rank] = {"owned": emb.owned, "results": results, "batches": batches,
                     "state": {k: v.clone() for k, v in emb.state_dict().items()}}
        # each rank writes its shard the way a session's checkpoint does
        name = "state.pt" if rank == 0 else f"state.rank{rank}.pt"
        write_files({name: {"model": emb.state_dict(), "table_optimizer": emb.optimizer_state()}},
                    Path(ckpt))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_tables_look_up_what_one_process_does_and_split_the_bytes(tmp_path):
    import torch.multiprocessing as mp

    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sharded_rank, args=(2, port, out, str(tmp_path)), nprocs=2, join=True)
        out = dict(out)
    single = TorchRecEmbedding(SCHEMA, 8, seed=3)
    owned = [set(out[r]["owned"]) for r in (0, 1)]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == {0, 1, 2, 3}
    assert sorted(out[0]["owned"] + out[1]["owned"]) == sorted(
        i for i, _ in enumerate(table_placement(SCHEMA, 8, 2)))
    # the ranks' saved shards, merged, are the single process's tables (same seeded draw)
    merged = {**out[1]["state"], **out[0]["state"]}
    for i, table in single.tables().items():
        assert torch.equal(merged[f"tables.{i}"], table)
    for rank in (0, 1):
        for b, got in zip(out[rank]["batches"], out[rank]["results"]):
            assert torch.equal(got, single(b, torch.zeros(16, 2)).detach())
    # the two shard files, read as one checkpoint, restore every table in one process, with
    # its row-wise optimiser state, in either backend
    state, _ = read_state(tmp_path)
    assert {k for k in state["table_optimizer"]} == {f"{i}.momentum1" for i in range(4)}
    for emb in (TorchRecEmbedding(SCHEMA, 8, seed=9), TorchEmbedding(SCHEMA, 8, seed=9)):
        emb.load_state_dict(state["model"])
        for i, table in single.tables().items():
            assert torch.equal(emb.tables()[i], table)
