"""The `torchrec` backend: TorchRec tables on FBGEMM's table-batched kernels, one table per
field, the optimiser fused into the backward pass; sharded table-wise across workers by
TorchRec's planner (DistributedModelParallel)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hilomoe.errors import HilomoeError
from hilomoe.model.embedding.base import FeatureEmbedding, TableOptimizer, init_table
from hilomoe.schema import FeatureSchema


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
