"""Field embeddings: one table per categorical field and one vector per numeric field.

    cat: (B, F_c) int64 ids, id_f in [0, V_f);  num: (B, F_n) float
      -> x0 = [T_1[id_1], ..., T_Fc[id_Fc], num_1 w_1, ..., num_Fn w_Fn]:  (B, (F_c + F_n) e)

(the numeric embedding v * w_j is FuxiCTR's). Two backends, `model.embedding.backend`:

    TorchRecEmbedding  TorchRec tables on FBGEMM's table-batched kernels, one table per field.
                       In one process a FusedEmbeddingBagCollection; across workers a
                       DistributedModelParallel whose planner places each table on one rank
                       (table-wise sharding, byte-balanced). The optimiser is fused into the
                       backward pass and touches only the rows a batch used.
    TorchEmbedding     every field in one nn.Embedding with per-field id offsets, sparse gradients
                       and a sparse torch optimiser (engine/optimizers.py), replicated on every
                       worker. `sparse=False` is the dense reference (a gradient for every row,
                       every step) that the equivalence tests compare against; no config picks it.

Both save the same state: `tables.{i}` (V_i, e) for categorical field i and `numeric` (F_n, e).
A sharded backend saves and loads only the tables its rank holds (table-wise shards, so a table
is always whole). Weights therefore move between backends, and a checkpoint written by W workers
loads on any other number of them.

Training: with `trainable` off the lookups run without autograd, so no gradient (and no fused
update) reaches the tables: stage 2 freezes the base. `configure(spec)` sets the tables'
optimiser for the next stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hilomoe.errors import HilomoeError
from hilomoe.schema import FeatureSchema

INIT_STD = 0.05
OptimizerKind = Literal["rowwise_adagrad", "adagrad", "adam", "sgd"]


@dataclass(frozen=True)
class TableOptimizer:
    """How the tables train in a stage: FBGEMM's exact (deduplicated) row updates, or the
    torch optimiser with the same update rule (engine/optimizers.py).

        sgd              w_i -= lr g_i
        adagrad          s_i += g_i^2 (per element);       w_i -= lr g_i / (sqrt(s_i) + eps)
        rowwise_adagrad  s_i += mean(g_i^2) (one per row);  w_i -= lr g_i / (sqrt(s_i) + eps)
        adam             Adam on the rows a batch touched

    with g_i the sum of row i's gradients over the batch; rows the batch did not use keep their
    weights and their optimiser state."""

    kind: OptimizerKind
    lr: float
    eps: float = 1e-8


def init_table(seed: int, index: int, rows: int, dim: int, device=None) -> Tensor:
    """Table `index`'s initial weights, N(0, 0.05^2), from a generator of its own: each rank
    draws only the tables it holds, and the draw does not depend on the backend."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.empty(rows, dim).normal_(0.0, INIT_STD, generator=g).to(device)


class FeatureEmbedding(nn.Module):
    """The interface of both backends (see the module docstring)."""

    fused = False  # True: the optimiser runs inside the backward pass (nothing to step)

    def __init__(self, schema: FeatureSchema, dim: int, seed: int = 0, device=None):
        super().__init__()
        self.schema, self.dim = schema, dim
        self.trainable = True
        self.numeric = nn.Parameter(init_table(seed, len(schema.vocab_sizes), schema.numeric,
                                               dim, device))

    def forward(self, cat: Tensor, num: Tensor) -> Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            tables = self.lookup(cat)  # (B, F_c * e)
        # (B, F_n * e); with no numeric field an empty product, still in the graph, so that DDP
        # sees a gradient for every parameter it was given
        numeric = (num.unsqueeze(-1) * self.numeric).flatten(1)
        return torch.cat([tables, numeric], dim=1)

    def lookup(self, cat: Tensor) -> Tensor:
        """cat: (B, F_c) -> (B, F_c * e), field by field."""
        raise NotImplementedError

    def join(self) -> None:
        """Take part in the other ranks' lookups with no rows (a rank whose evaluation shard ran
        out first: sharded lookups are collective). Nothing to do unless sharded."""

    @property
    def owned(self) -> list[int]:
        """The categorical fields whose tables this process holds."""
        return list(range(len(self.schema.vocab_sizes)))

    def tables(self) -> dict[int, Tensor]:
        """This process's tables by field: (V_i, e) views of the live weights."""
        raise NotImplementedError

    def table_parameters(self) -> list[nn.Parameter]:
        """Parameters a torch optimiser steps for the tables ([] when the update is fused)."""
        return []

    def configure(self, spec: TableOptimizer | None) -> None:
        """Before a stage: None freezes the tables; a fused backend builds its kernels for
        `spec` (and starts its optimiser state afresh, like every stage's optimiser)."""
        self.trainable = spec is not None

    # -- one state layout for every backend --------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "numeric"] = self.numeric if keep_vars else self.numeric.detach()
        for i, table in self.tables().items():
            destination[f"{prefix}tables.{i}"] = table if keep_vars else table.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        known = {f"{prefix}tables.{i}" for i in range(len(self.schema.vocab_sizes))}
        known.add(prefix + "numeric")
        children = tuple(f"{prefix}{name}." for name in self._modules)
        for key in state_dict:  # tables held by other ranks are known, not unexpected
            if key.startswith(prefix) and key not in known and not key.startswith(children) \
                    and strict:
                unexpected_keys.append(key)
        targets = {"numeric": self.numeric, **{f"tables.{i}": t for i, t in self.tables().items()}}
        with torch.no_grad():
            for name, target in targets.items():
                value = state_dict.get(prefix + name)
                if value is None:
                    missing_keys.append(prefix + name)
                elif value.shape != target.shape:
                    error_msgs.append(f"size mismatch for {prefix + name}: the checkpoint has "
                                      f"{tuple(value.shape)}, the model {tuple(target.shape)}")
                else:
                    target.copy_(value)


class _Rows(nn.Embedding):
    """Every field's rows in one table. An nn.Embedding, so that DDP expects its sparse
    gradient; its owner saves and loads it, field by field."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, *args, **kwargs):
        pass


class TorchEmbedding(FeatureEmbedding):
    """All fields in one (sum V_f, e) table; field f's ids are offset by sum_{g<f} V_g."""

    def __init__(self, schema: FeatureSchema, dim: int, seed: int = 0, device=None,
                 sparse: bool = True):
        super().__init__(schema, dim, seed, device)
        self.sparse = sparse
        weight = torch.cat([init_table(seed, i, v, dim) for i, v in enumerate(schema.vocab_sizes)])
        self.rows = _Rows(*weight.shape, sparse=sparse, _weight=weight.to(device))
        offsets = torch.tensor([0, *schema.vocab_sizes[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets.to(device), persistent=False)

    def lookup(self, cat: Tensor) -> Tensor:
        return self.rows(cat + self.offsets).flatten(1)

    def tables(self) -> dict[int, Tensor]:
        bounds = self.offsets.tolist() + [self.rows.weight.shape[0]]
        return {i: self.rows.weight[lo:hi] for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))}

    def table_parameters(self) -> list[nn.Parameter]:
        return [self.rows.weight]


class TorchRecEmbedding(FeatureEmbedding):
    """TorchRec tables `t{i}` (feature `f{i}`), fused with their optimiser; sharded table-wise
    across the default process group when `sharded` and it has several ranks.

    The TorchRec module is held outside this module's children on purpose: its weights are not
    nn.Parameters that a dense optimiser, DDP or `.to()` should see; they are saved through the
    common `tables.{i}` layout and updated by FBGEMM in the backward pass.
    """

    fused = True

    def __init__(self, schema: FeatureSchema, dim: int, seed: int = 0, device=None,
                 sharded: bool = False):
        super().__init__(schema, dim, seed, device)
        torchrec = _import_torchrec()
        self.device = torch.device(device or "cpu")
        self.keys = [f"f{i}" for i in range(len(schema.vocab_sizes))]
        # FBGEMM's rows are multiples of 4 floats: a width of 10 is stored as 12, the two extra
        # columns never leave the kernel (no gradient reaches them; they stay zero)
        self.width = -(-dim // 4) * 4
        self.configs = [torchrec.EmbeddingBagConfig(name=f"t{i}", embedding_dim=self.width,
                                                     num_embeddings=v, feature_names=[key])
                        for i, (v, key) in enumerate(zip(schema.vocab_sizes, self.keys))]
        import torch.distributed as dist

        self.group = (dist.GroupMember.WORLD if sharded and dist.is_initialized()
                      and dist.get_world_size() > 1 else None)
        self.plan = None
        self.spec: TableOptimizer | None = None
        self._order: list[int] | None = None  # output column blocks -> field order
        self._lengths: dict[int, Tensor] = {}
        self._build(TableOptimizer("sgd", 0.0))
        with torch.no_grad():
            for i, stored in self._stored().items():
                stored[:, :dim].copy_(init_table(seed, i, stored.shape[0], dim))
                stored[:, dim:].zero_()

    # -- kernels -----------------------------------------------------------------------------

    def _build(self, spec: TableOptimizer) -> None:
        """(Re)create the kernels fused with `spec`, keeping the weights of any previous ones."""
        old = {i: t.detach().clone() for i, t in self._stored().items()} if self.spec else {}
        self.__dict__["kernel"] = None  # free the old kernels before allocating new ones
        if self.group is None:
            from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

            opt_type, kwargs = _fused_optimizer(spec)
            kernel = FusedEmbeddingBagCollection(self.configs, optimizer_type=opt_type,
                                                 optimizer_kwargs=kwargs, device=self.device)
        else:
            kernel = self._shard(spec)
        self.__dict__["kernel"] = kernel
        self.spec, self._order = spec, None
        with torch.no_grad():
            for i, table in self._stored().items():
                if i in old:
                    table.copy_(old[i])

    def _shard(self, spec: TableOptimizer):
        from torchrec import EmbeddingBagCollection
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv

        root = _TablesRoot(EmbeddingBagCollection(tables=self.configs,
                                                  device=torch.device("meta")))
        sharder = table_sharder(spec)
        if self.plan is None:  # computed on rank 0, broadcast; the same for every stage
            self.plan = make_planner(len(self.configs), self.group.size(),
                                     self.device.type).collective_plan(root, [sharder], self.group)
        return DistributedModelParallel(root, env=ShardingEnv.from_process_group(self.group),
                                        device=self.device, plan=self.plan, sharders=[sharder],
                                        data_parallel_wrapper=_NoDataParallel())

    def configure(self, spec: TableOptimizer | None) -> None:
        super().configure(spec)
        if spec is not None:
            if spec.kind == "adam" and self.device.type == "cpu":
                raise HilomoeError(
                    "embedding_optimizer adam: FBGEMM has no fused Adam on the CPU; use "
                    "rowwise_adagrad, adagrad or sgd, or model.embedding.backend: torch.")
            self._build(spec)

    # -- lookups -----------------------------------------------------------------------------

    def _kjt(self, cat: Tensor):
        from torchrec import KeyedJaggedTensor

        n = cat.numel()
        if n not in self._lengths:  # one id per field and sample
            self._lengths = {n: torch.ones(n, dtype=torch.int32, device=cat.device)}
        return KeyedJaggedTensor(keys=self.keys, values=cat.t().reshape(-1),
                                 lengths=self._lengths[n])

    def lookup(self, cat: Tensor) -> Tensor:
        pooled = self.kernel(self._kjt(cat))  # a KeyedTensor: (B, F_c * e), blocks by key
        if self._order is None:  # a sharded collection returns its keys grouped by rank
            keys = pooled.keys()
            order = [keys.index(k) for k in self.keys]
            self._order = order
        values = pooled.values()
        if self._order != sorted(self._order) or self.width > self.dim:
            fields = values.view(values.shape[0], len(self.keys), self.width)
            values = fields[:, self._order, : self.dim].flatten(1)
        return values

    def join(self) -> None:
        if self.group is not None:
            with torch.no_grad():
                self.kernel(self._kjt(torch.zeros(0, len(self.keys), dtype=torch.long,
                                                  device=self.device)))

    # -- state -------------------------------------------------------------------------------

    def _local(self, entries: dict) -> dict[int, Tensor]:
        """{field: local tensor} of a TorchRec state mapping keyed by `...t{i}...` names."""
        out = {}
        for key, value in entries.items():
            if hasattr(value, "local_shards"):  # a ShardedTensor: whole tables, or nothing
                shards = value.local_shards()
                if not shards:
                    continue
                value = shards[0].tensor
            out[_table_index(key)] = value
        return out

    @property
    def owned(self) -> list[int]:
        return sorted(self.tables())

    def _stored(self) -> dict[int, Tensor]:
        """The kernels' tables as stored: (V_i, width)."""
        kernel = self.__dict__.get("kernel")
        return self._local(kernel.state_dict()) if kernel is not None else {}

    def tables(self) -> dict[int, Tensor]:
        return {i: t[:, : self.dim] for i, t in self._stored().items()}

    def optimizer_state(self) -> dict[str, Tensor]:
        """The fused optimiser's state of this process's tables: `{i}.{name}` -> views."""
        out = {}
        optimizer = self.kernel.fused_optimizer  # a method of the unsharded collection
        optimizer = optimizer() if callable(optimizer) else optimizer
        for key, states in optimizer.state_dict()["state"].items():
            for name, value in states.items():
                if not isinstance(value, Tensor) and not hasattr(value, "local_shards"):
                    continue
                local = self._local({key: value})
                for i, t in local.items():
                    # momentum1 (sharded) and momentum_1 (one process) are the same state
                    out[f"{i}.{name.rsplit('.', 1)[-1].replace('_', '')}"] = t
        return out

    def load_optimizer_state(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, target in self.optimizer_state().items():
                if name in state:
                    target.copy_(state[name])


class _TablesRoot(nn.Module):
    """The module DistributedModelParallel shards: the collection and nothing else."""

    def __init__(self, ebc: nn.Module):
        super().__init__()
        self.ebc = ebc

    def forward(self, features):
        return self.ebc(features)


def _table_index(key: str) -> int:
    """`ebc.embedding_bags.t12.weight` / `t12.weight` -> 12."""
    for part in key.split("."):
        if part.startswith("t") and part[1:].isdigit():
            return int(part[1:])
    raise KeyError(key)


def _import_torchrec():
    try:
        import torchrec
    except (ImportError, OSError) as err:
        raise HilomoeError(
            f"model.embedding.backend torchrec needs TorchRec and FBGEMM ({err}); install them "
            "with `pip install fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.8.0` "
            "(see the README), or set model.embedding.backend: torch.") from None
    return torchrec


def _fused_optimizer(spec: TableOptimizer) -> tuple[type, dict]:
    """FusedEmbeddingBagCollection's (optimizer class, kwargs): torchrec maps them to FBGEMM's
    EXACT_SGD, EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD and ADAM."""
    from torchrec.optim import RowWiseAdagrad

    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
           "rowwise_adagrad": RowWiseAdagrad, "adam": torch.optim.Adam}[spec.kind]
    kwargs = {"lr": spec.lr} if spec.kind == "sgd" else {"lr": spec.lr, "eps": spec.eps}
    return cls, kwargs


def table_sharder(spec: TableOptimizer):
    """TorchRec's EmbeddingBagCollection sharder with the stage's fused optimiser."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    kind = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
            "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "adam": EmbOptimType.ADAM}[spec.kind]
    params = {"optimizer": kind, "learning_rate": spec.lr}
    if spec.kind != "sgd":
        params["eps"] = spec.eps
    return EmbeddingBagCollectionSharder(fused_params=params)


def make_planner(tables: int, world: int, device: str = "cpu"):
    """TorchRec's planner, constrained to whole tables on fused kernels: each table lives on
    one rank (no row-wise all-to-all of partial sums, which the CPU's gloo is slow at)."""
    from torchrec.distributed.planner import (EmbeddingShardingPlanner, ParameterConstraints,
                                              Topology)

    constraints = {f"t{i}": ParameterConstraints(sharding_types=["table_wise"],
                                                 compute_kernels=["fused"])
                   for i in range(tables)}
    return EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device=device),
                                    constraints=constraints)


def table_placement(schema: FeatureSchema, dim: int, world: int) -> list[int]:
    """The planner's rank for each categorical field's table on `world` workers (no process
    group needed: the same plan `collective_plan` computes)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    _import_torchrec()
    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=v,
                                  feature_names=[f"f{i}"]) for i, v in enumerate(schema.vocab_sizes)]
    root = _TablesRoot(EmbeddingBagCollection(tables=configs, device=torch.device("meta")))
    plan = make_planner(len(configs), world).plan(root, [table_sharder(TableOptimizer("sgd", 0.0))])
    shards = plan.get_plan_for_module("ebc")
    return [shards[f"t{i}"].ranks[0] for i in range(len(configs))]


class _NoDataParallel:
    """DistributedModelParallel wraps the unsharded rest in DDP by default; here there is no
    rest, and the dense model's DDP is the engine's (re-wrapped per stage)."""

    def wrap(self, dmp, env, device) -> None:
        pass


def make_embedding(schema: FeatureSchema, dim: int, backend: str = "torchrec", seed: int = 0,
                   device=None, sharded: bool = False) -> FeatureEmbedding:
    """The configured backend; `sharded`: split TorchRec tables across the process group."""
    if backend == "torchrec":
        return TorchRecEmbedding(schema, dim, seed, device, sharded)
    return TorchEmbedding(schema, dim, seed, device)


STATE_FLOATS_PER_ROW = {"sgd": lambda e: 0, "rowwise_adagrad": lambda e: 1,
                        "adagrad": lambda e: e, "adam": lambda e: 2 * e}


def embedding_bytes(schema: FeatureSchema, dim: int, backend: str, workers: int,
                    optimizer: OptimizerKind = "rowwise_adagrad") -> list[int]:
    """Bytes each of `workers` ranks holds for the categorical tables and their optimiser
    state (fp32): TorchRec's planner gives each table to one rank (FBGEMM rounds a row up to a
    multiple of 4 floats); the torch backend keeps every table on every rank."""
    width = -(-dim // 4) * 4 if backend == "torchrec" else dim
    per_row = width + STATE_FLOATS_PER_ROW[optimizer](width)
    sizes = [4 * v * per_row for v in schema.vocab_sizes]
    if backend != "torchrec" or workers == 1:
        return [sum(sizes)] * workers
    out = [0] * workers
    for size, rank in zip(sizes, table_placement(schema, dim, workers)):
        out[rank] += size
    return out
