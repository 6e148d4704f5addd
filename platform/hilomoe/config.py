"""Typed configuration: validated once at the edge (YAML file or dict), then passed as objects.

Every model forbids unknown keys, so a typo is an error that names its key path rather than a
setting silently ignored. `load_config(path)` is the one entry point the command line uses; a bad
file raises `ConfigError` whose message is one sentence per problem, each naming
`file: key.path: what is allowed`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from hilomoe.errors import HilomoeError


class ConfigError(HilomoeError):
    """A configuration file or value that cannot be used; the message names the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def plain_name_problem(value: str) -> str | None:
    """Why `value` cannot name a file or directory inside another one, or None when it can.
    Names become paths (a study's `runs/<name>`, a dataset's shards), so `../x`, `a/b` and
    absolute paths would write or read outside the directory meant."""
    if _PLAIN_NAME.fullmatch(value) and value not in (".", ".."):
        return None
    return (f"{value!r} is used as a file or directory name: use letters, digits, '.', '_' and "
            f"'-', starting with a letter or digit (no '/', '..' or absolute path)")


def _plain_name(value: str) -> str:
    problem = plain_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


PlainName = Annotated[str, AfterValidator(_plain_name)]


# ----------------------------------------------------------------------------------------------
# data


class PlantedData(Strict):
    """An in-memory planted CTR problem with a hierarchy of latent segments (see data/planted.py)."""

    rows: int = Field(60_000, ge=100, description="total rows, split into train/valid/test")
    categorical_fields: int = Field(6, ge=1)
    vocab_size: int = Field(20, ge=2, description="ids per categorical field")
    zipf_exponent: float = Field(1.05, gt=0.0)
    numeric_fields: int = Field(2, ge=0)
    depth: int = Field(3, ge=1, description="levels of the latent segment tree")
    branching: int = Field(4, ge=2, description="children per segment")
    latent_dim: int = Field(4, ge=1)
    segment_strength: float = Field(3.0, ge=0.0, description="scale of per-segment interactions")
    valid_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    seed: int = 0


class DataConfig(Strict):
    """Where rows come from: a canonical dataset directory (`path`, see data/dataset.py), or,
    without one, the planted problem described by `synth`, generated in memory."""

    path: str | None = None
    synth: PlantedData = PlantedData()
    train_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="train on this fraction of the train split: a nested, "
        "seeded subset (data/subset.py); valid and test stay whole")
    subset_seed: int = Field(0, description="which subset train_fraction draws")


# ----------------------------------------------------------------------------------------------
# model


class Variant(str, Enum):
    """The model family; one key switches a study between HiLoMoE and its ablations."""

    DENSE = "dense"  # the non-MoE baseline (identical to HiLoMoE with levels = 0)
    HILOMOE = "hilomoe"  # levels route on the previous level's scores; all levels run batched
    FLAT = "flat"  # one level holding levels*experts experts, levels*top_k active
    SEQUENTIAL = "sequential"  # level l+1 routes on level l's output (conventional stacking)
    DENSE_EXPERTS = "dense_experts"  # classic MoE: `experts` full-rank experts, top_k active


class MoEConfig(Strict):
    variant: Variant = Variant.HILOMOE
    levels: int = Field(2, ge=0, le=64, description="L, levels of experts (0 = no experts)")
    experts: int = Field(8, ge=1, le=4096, description="K, experts per level")
    rank: int = Field(1, ge=1, le=256, description="r, LoRA rank of each expert")
    top_k: int = Field(2, ge=1, description="experts selected per level in sparse routing")
    temperature: float = Field(1.0, gt=0.0)
    router_projection: Literal["identity", "learned"] = "identity"
    router_norm: bool = Field(True, description="route on x / rms(x) (scale-free logits)")
    apply_to: tuple[Literal["mlp", "cross"], ...] = ("mlp", "cross")

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be at most experts ({self.experts})"
            )
        if not self.apply_to:
            raise ValueError("apply_to must name at least one of 'mlp', 'cross'")
        return self

    @property
    def has_experts(self) -> bool:
        return self.variant is not Variant.DENSE and self.levels > 0


# what a variant's projection never reads (model/layers.py: make_projection), at the default
UNREAD_MOE_SETTINGS: dict[Variant, dict[str, Any]] = {
    Variant.SEQUENTIAL: {"router_projection": "identity"},
    Variant.DENSE_EXPERTS: {"rank": 1, "router_projection": "identity"},
}


class BackboneConfig(Strict):
    mlp: tuple[int, ...] = Field((128, 64), description="MLP widths, one per layer")
    cross_layers: int = Field(2, ge=0, le=16, description="DCNv2 cross layers")
    structure: Literal["parallel", "stacked"] = "parallel"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> BackboneConfig:
        if any(w < 1 for w in self.mlp):
            raise ValueError(f"mlp widths must be positive integers, got {list(self.mlp)}")
        if not self.mlp and self.cross_layers == 0:
            raise ValueError("the backbone needs at least one mlp layer or one cross layer")
        return self


class EmbeddingConfig(Strict):
    """How the categorical fields' tables are stored and trained (model/embedding/).

    torchrec  one TorchRec table per field on FBGEMM's table-batched kernels, updated in the
              backward pass by a fused row-wise optimiser, sharded table-wise across Ray Train
              workers (DistributedModelParallel) when there are several
    torch     one `nn.Embedding(sparse=True)` holding every field, a sparse torch optimiser, and
              replicated on every worker (DDP all-reduces its sparse gradients)
    """

    backend: Literal["torchrec", "torch"] = "torchrec"


class ModelConfig(Strict):
    embedding_dim: int = Field(8, ge=1, le=1024)
    embedding: EmbeddingConfig = EmbeddingConfig()
    backbone: BackboneConfig = BackboneConfig()
    moe: MoEConfig = MoEConfig()


# ----------------------------------------------------------------------------------------------
# stages


class StageName(str, Enum):
    BASE = "base"
    EXPERTS = "experts"
    JOINT = "joint"


class AuxWeights(Strict):
    balance: float = Field(0.0, ge=0.0)
    z: float = Field(0.0, ge=0.0)
    diversity: float = Field(0.0, ge=0.0)


class StageConfig(Strict):
    enabled: bool = True
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    batch_size: int = Field(512, ge=1)
    patience: int = Field(2, ge=1, description="epochs without a better validation AUC")
    min_delta: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    aux: AuxWeights = AuxWeights()
    base_lr_mult: float = Field(
        1.0, gt=0.0, description="learning-rate multiplier of base parameters (joint stage)"
    )
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "adam", "sgd"] = Field(
        "rowwise_adagrad", description="the embedding tables' sparse optimiser: it updates "
        "only the rows a batch touches (adam: Adam on touched rows; FBGEMM has it on GPUs only)")
    embedding_lr: float | None = Field(
        None, gt=0.0, description="the tables' learning rate (default: EMBEDDING_LR of the "
        "optimiser); the joint stage multiplies it by base_lr_mult like every base parameter")


# The recipe's per-stage defaults. A file overrides them key by key (deep merge), so setting
# `stages.joint.lr` keeps the joint stage's base_lr_mult and auxiliary weights.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "base": {},
    "experts": {"aux": {"balance": 0.01, "diversity": 0.01}},
    "joint": {"lr": 5e-4, "base_lr_mult": 0.1, "aux": {"balance": 0.01, "z": 1e-3}},
}


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class StagesConfig(Strict):
    """The three-stage recipe; any stage can be switched off (`enabled: false`)."""

    base: StageConfig = StageConfig(**STAGE_DEFAULTS["base"])
    experts: StageConfig = StageConfig(**STAGE_DEFAULTS["experts"])
    joint: StageConfig = StageConfig(**STAGE_DEFAULTS["joint"])

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        merged = dict(raw)
        for name, defaults in STAGE_DEFAULTS.items():
            if isinstance(raw.get(name), dict):
                merged[name] = deep_merge(defaults, raw[name])
        return merged

    def get(self, name: StageName) -> StageConfig:
        return getattr(self, name.value)


# ----------------------------------------------------------------------------------------------
# how training runs: everywhere (runtime), and on Ray Train (ray)


class RuntimeConfig(Strict):
    """How the model computes, wherever it trains (`--local`, Ray Train, a study's trials)."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 elsewhere")
    compile: bool = Field(False, description="torch.compile the model")


# settings that moved from `ray:` to `runtime:`; a configuration that still gives them under
# `ray:` means the same
RUNTIME_KEYS = tuple(RuntimeConfig.model_fields)


class RayConfig(Strict):
    """How `hilomoe train` (without --local) runs on Ray Train; command-line flags override."""

    workers: int = Field(1, ge=1, le=4096, description="training workers (DDP ranks)")
    gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float | None = Field(
        None, gt=0.0, description="default: the cluster's CPUs, less data_cpus, shared out")
    data_cpus: float | None = Field(
        None, ge=1.0, description="CPUs kept free for Ray Data's read tasks (default max(1, 10%))")
    max_failures: int = Field(2, ge=0, description="worker-group restarts before giving up")
    keep_checkpoints: int = Field(2, ge=1, description="best checkpoints kept, by validation AUC")
    storage: str | None = Field(None, description="checkpoint storage: a directory or a URI")
    shuffle_buffer: int = Field(262_144, ge=0, description="rows in each worker's shuffle buffer")
    eval_cache_mb: float = Field(
        1024.0, ge=0.0, description="a worker keeps its shard of the validation split in memory "
        "after the first pass when the shard is at most this size (MB), instead of streaming it "
        "again every epoch; 0: always stream")
    reader: Literal["ray_data", "parquet"] = Field(
        "ray_data", description="ray_data: each worker streams its shard from Ray Data; "
        "parquet: each worker reads its own rows of the files with pyarrow (every worker must "
        "see the dataset path: one machine, a shared filesystem, or a cloud URI)")


# ----------------------------------------------------------------------------------------------
# top level


class TrainConfig(Strict):
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stages: StagesConfig = StagesConfig()
    eval_batch_size: int = Field(4096, ge=1)
    runtime: RuntimeConfig = RuntimeConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _runtime_from_ray(cls, raw: Any) -> Any:
        """`ray.precision` and `ray.compile` (where they were first) are read as `runtime.*`;
        a key given in both places must agree."""
        if not isinstance(raw, dict) or not isinstance(raw.get("ray"), dict):
            return raw
        moved = {k: v for k, v in raw["ray"].items() if k in RUNTIME_KEYS}
        if not moved:
            return raw
        runtime = raw.get("runtime") or {}
        if not isinstance(runtime, dict):
            return raw
        for key, value in moved.items():
            if key in runtime and runtime[key] != value:
                raise ValueError(f"ray.{key} ({value!r}) and runtime.{key} ({runtime[key]!r}) "
                                 f"disagree; give it once, under runtime")
        ray = {k: v for k, v in raw["ray"].items() if k not in RUNTIME_KEYS}
        return {**raw, "ray": ray, "runtime": {**moved, **runtime}}

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        s = self.stages
        if not (s.base.enabled or s.experts.enabled or s.joint.enabled):
            raise ValueError("stages: at least one of base, experts, joint must be enabled")
        if not self.model.moe.has_experts and not s.base.enabled:
            raise ValueError(
                "stages.base.enabled must be true for a model without experts "
                "(variant 'dense' or levels 0 trains only in the base stage)"
            )
        return self

    def effective(self) -> TrainConfig:
        """The same training with every setting it never reads at its default, so that two
        configurations that train the same model compare equal (a study's distinct points,
        the trial cache's key). A model without experts (variant dense, or levels 0) runs only
        the base stage: it keeps no MoE setting and no recipe for the experts and joint
        stages. A variant keeps no setting its projection ignores (`make_projection`), and a
        disabled stage keeps no recipe."""
        moe, stages = self.model.moe, self.stages.model_dump()
        if not moe.has_experts:
            moe = MoEConfig(variant=Variant.DENSE)
            stages["experts"] = stages["joint"] = {"enabled": False}
        else:
            moe = moe.model_copy(update=UNREAD_MOE_SETTINGS.get(moe.variant, {}))
        for name, stage in stages.items():
            if not stage["enabled"]:
                stages[name] = {**STAGE_DEFAULTS[name], "enabled": False}
        model = self.model.model_copy(update={"moe": moe})
        return self.model_copy(update={"model": model, "stages": StagesConfig(**stages)})

    def with_overrides(self, **changes: Any) -> TrainConfig:
        """A copy with dotted-path overrides applied and validated again, e.g.
        `cfg.with_overrides(**{"data.path": "data/x", "ray.workers": 2})`; a mapping value
        merges into the mapping at its path."""
        raw = self.model_dump(mode="json")
        for path, value in changes.items():
            if path.startswith("ray.") and path[4:] in RUNTIME_KEYS:  # where it was first
                path = "runtime." + path[4:]
            node = raw
            *parents, leaf = path.split(".")
            for key in parents:
                node = node[key]
            # a mapping merges into the mapping it names (a stage recipe keeps its other keys)
            if isinstance(value, dict) and isinstance(node.get(leaf), dict):
                value = deep_merge(node[leaf], value)
            node[leaf] = value
        return parse_config(raw, "command line")


# ----------------------------------------------------------------------------------------------
# loading and error messages


def _key_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(parts) if parts else "(top level)"


def format_validation_error(err: ValidationError, source: str) -> str:
    """One sentence per problem: `source: key.path: message (got value)`."""
    lines = []
    for e in err.errors():
        path = _key_path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the documented schema)"
        elif e["type"] not in ("value_error",) and "input" in e:
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{source}: {path}: {msg}.")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "config", model: type[BaseModel] = TrainConfig):
    """Validate a decoded YAML/JSON document into `model`, raising ConfigError on bad input."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}.")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, model: type[BaseModel] = TrainConfig):
    """Read and validate a YAML configuration file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such configuration file.")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(err, 'problem', err)}.") from None
    return parse_config(raw, str(p), model)


# ----------------------------------------------------------------------------------------------
# plain data with a typed view


class TypedView:
    """A validated, cached view of a dataclass field that holds a model's JSON form.

        @dataclass
        class TrainRun:
            config: dict                                    # what is saved, pickled, sent to Ray
            cfg = TypedView("config", lambda run: f"{run.out_dir}/run.json")

    The JSON form travels (run files, Ray's train_loop_config, Tune's pickled trainables); the
    view is validated the first time it is read and again only when the field is replaced.
    `parse(raw, source)` validates (default: `parse_config` into a TrainConfig); `source` names
    the origin in its error messages, a string or a function of the instance.
    """

    def __init__(self, field: str, source: str | Any = "config", parse: Any = None):
        self.field, self.source = field, source
        self.parse = parse or (lambda raw, source: parse_config(raw, source))

    def __set_name__(self, owner: type, name: str) -> None:
        self.cache = f"_{name}_view"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        raw = getattr(obj, self.field)
        cached = obj.__dict__.get(self.cache)
        if cached is None or cached[0] is not raw:  # first read, or the field was replaced
            source = self.source(obj) if callable(self.source) else self.source
            cached = obj.__dict__[self.cache] = (raw, self.parse(raw, source))
        return cached[1]
