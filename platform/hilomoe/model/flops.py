"""Analytic FLOPs and parameter counts, from the configuration alone (no model is built).

Convention (the one of torch.utils.flop_counter and fvcore): a FLOP count is 2 x the
multiply-adds of matrix products; element-wise work (activations, softmax, top-k, bias adds,
the cross layer's Hadamard product) and table lookups count zero. The sparse expert product
(`embedding_bag` with per-sample weights) counts 2 x rows x d_out, registered as such in
`measured_flops`. Forward+backward is 3 x forward (each product's two gradients).

Per-sample forward FLOPs of one d_in -> d_out projection (B = batch, L levels, K experts per
level, r rank, k top-k; flat = L' 1 level of L*K experts with L*k active):

    base W0 x                           2 d_in d_out
    HiLoMoE  down x V^T (all experts)   2 d_in L K r           (= the routing logits when P = I)
             learned P and its logits   2 d_in^2 + 2 d_in L K
             keys' Gram matrix          2 (L K)^2 d_in / B     (once per batch)
             score recurrence           K^2 L (L - 1)          (the dense (B, K) x (K, .) form;
                                                               the fused CPU kernel skips the
                                                               zeros of sparse scores: k/K of it)
             up (sparse / dense)        2 L k r d_out  /  2 L K r d_out
    sequential: down as above, routers (L-1) 2 d_out K, up as above
    dense_experts: router 2 d_in K, experts 2 k d_in d_out (dense: 2 K d_in d_out + 2 K d_out)

Active parameters are those one sample's forward reads: its embedding rows, every dense weight,
every expert's down factor V (all feed the routing), and only the selected experts' up factors
U (or full-rank matrices).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from hilomoe.config import MoEConfig, ModelConfig, TrainConfig, Variant
from hilomoe.model.ctr import projection_specs
from hilomoe.schema import FeatureSchema
import hilomoe.model.fused as fused
from hilomoe.model.routing import RoutingMode


@dataclass
class Cost:
    """Parameters and per-sample forward FLOPs of a model or one of its parts."""

    params_total: int = 0
    params_active: float = 0
    params_embedding: int = 0
    flops: float = 0.0
    parts: dict[str, Cost] = field(default_factory=dict)

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.params_total + other.params_total,
            self.params_active + other.params_active,
            self.params_embedding + other.params_embedding,
            self.flops + other.flops,
        )

    def as_dict(self) -> dict:
        return {
            "params_total": self.params_total,
            "params_active": int(self.params_active),
            "params_embedding": self.params_embedding,
            "flops_analytic": self.flops,
        }


def _dense(d_in: int, d_out: int) -> Cost:
    n = d_in * d_out + d_out
    return Cost(n, n, 0, 2.0 * d_in * d_out)


def _lora_bank(d_in: int, d_out: int, L: int, K: int, r: int, k: int, sparse: bool) -> Cost:
    """V and U of L*K rank-r experts: all down-projections, k (or K) up-projections per level."""
    down, up = L * K * r * d_in, L * K * r * d_out
    used = L * (k if sparse else K) * r
    return Cost(down + up, down + used * d_out, 0, 2.0 * d_in * L * K * r + 2.0 * used * d_out)


def projection_cost(
    d_in: int, d_out: int, moe: MoEConfig | None, mode: RoutingMode, batch: int
) -> Cost:
    """Cost of one projection with the given experts (None: plain dense) in a routing mode."""
    base = _dense(d_in, d_out)
    if moe is None or not moe.has_experts:
        return base
    if mode is RoutingMode.OFF:
        # the experts exist as parameters, but no sample reads them and they do no work
        full = _with_experts(base, d_in, d_out, moe, True, batch)
        return Cost(full.params_total, base.params_active, 0, base.flops)
    return _with_experts(base, d_in, d_out, moe, mode is RoutingMode.SPARSE, batch)


def _with_experts(
    base: Cost, d_in: int, d_out: int, moe: MoEConfig, sparse: bool, batch: int
) -> Cost:
    L, K, k, r = moe.levels, moe.experts, moe.top_k, moe.rank
    v = moe.variant
    if v is Variant.FLAT:
        L, K, k = 1, L * K, L * k
    if v in (Variant.HILOMOE, Variant.FLAT):
        cost = base + _lora_bank(d_in, d_out, L, K, r, k, sparse)
        if moe.router_projection == "learned":
            cost = cost + Cost(d_in * d_in, d_in * d_in, 0, 2.0 * d_in * d_in + 2.0 * d_in * L * K)
        if L > 1:
            cost.flops += 2.0 * (L * K) ** 2 * d_in / batch + float(K * K * L * (L - 1))
        return cost
    if v is Variant.SEQUENTIAL:
        routers = (L - 1) * K * d_out
        return base + _lora_bank(d_in, d_out, L, K, r, k, sparse) + Cost(routers, routers, 0, 2.0 * routers)
    if v is Variant.DENSE_EXPERTS:
        used = k if sparse else K
        flops = 2.0 * d_in * K + 2.0 * used * d_in * d_out + (0.0 if sparse else 2.0 * K * d_out)
        return base + Cost(K * d_in * (1 + d_out), K * d_in + used * d_in * d_out, 0, flops)
    raise ValueError(f"unknown variant {v!r}")


def model_cost(
    schema: FeatureSchema,
    cfg: ModelConfig,
    mode: RoutingMode = RoutingMode.SPARSE,
    batch: int = 4096,
) -> Cost:
    """Analytic cost of the CTR model; `parts` breaks it down by projection."""
    e = cfg.embedding_dim
    emb = (sum(schema.vocab_sizes) + schema.numeric) * e
    total = Cost(emb, schema.num_fields * e, emb, 0.0)
    parts = {"embedding": Cost(emb, schema.num_fields * e, emb, 0.0)}
    for spec in projection_specs(schema, cfg):
        part = projection_cost(spec.d_in, spec.d_out, cfg.moe if spec.experts else None, mode, batch)
        parts[spec.name] = part
        total = total + part
    total.parts = parts
    return total


def trial_cost(cfg: TrainConfig, schema: FeatureSchema) -> dict:
    """FLOPs per sample and parameter counts of a training configuration: known before
    training, reported with every result of a study trial (an objective may minimise them)."""
    c = model_cost(schema, cfg.model, batch=cfg.eval_batch_size).as_dict()
    return {"flops": c["flops_analytic"], "params_total": c["params_total"],
            "params_active": c["params_active"], "params_embedding": c["params_embedding"]}


# ----------------------------------------------------------------------------------------------
# measured


def _embedding_bag_flops(weight_shape, indices_shape, *args, per_sample_weights=None, **kw) -> int:
    """2 x (selected rows) x d_out when weighted: the sparse expert product of experts.py."""
    # aten signature: (weight, indices, offsets, scale_grad_by_freq, mode, sparse,
    #                  per_sample_weights, include_last_offset, padding_idx)
    psw = per_sample_weights if per_sample_weights is not None else (args[4] if len(args) > 4 else None)
    if psw is None:
        return 0
    rows = 1
    for n in indices_shape:
        rows *= n
    return 2 * rows * weight_shape[1]


def _flop_counter() -> FlopCounterMode:
    aten = torch.ops.aten
    ops = [aten._embedding_bag, aten._embedding_bag_forward_only]
    return FlopCounterMode(display=False, custom_mapping={op: _embedding_bag_flops for op in ops})


@torch.no_grad()
def measured_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """Per-sample forward FLOPs of `model(*inputs)` counted by torch's FlopCounterMode."""
    counter = _flop_counter()
    with counter, fused.eager():  # the fused routing kernel is opaque to the counter
        model(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]
