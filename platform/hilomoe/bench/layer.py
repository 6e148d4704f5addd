"""`hilomoe bench layer`: forward+backward latency of one projection, HiLoMoE against its rivals.

All variants run side by side in one process on the same input, so their ratios are fair:

    hilomoe        L levels x K rank-1 experts, top-k, score-chained routing (batched)
    sequential     the same experts, level l+1 routing on level l's output (a loop over levels)
    flat           one level of L*K experts, top L*k
    dense          at levels = 0 the plain d x d projection; at levels = L a dense projection
                   widened to HiLoMoE's forward FLOPs at that L ("dense of equal FLOPs")
    dense_experts  a classic MoE of K full-rank experts, top-k (once, at levels = 1)

Reported FLOPs are analytic forward+backward (3 x forward, flops.py), for the whole batch; the
achieved rate is FLOPs / median time. Routing is sparse (top-k), the deployed mode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from hilomoe.config import MoEConfig, Variant
from hilomoe.model.flops import projection_cost
from hilomoe.model.layers import Projection, make_projection
from hilomoe.model.routing import RoutingMode


@dataclass
class Row:
    variant: str
    levels: int
    experts: int
    batch: int
    device: str
    ms: float  # median forward+backward milliseconds
    flops: float  # analytic forward+backward FLOPs of the whole batch
    d_in: int
    d_out: int

    @property
    def gflops_per_s(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd_ms(layer: Projection, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Milliseconds of one forward + backward (gradients for x and every parameter), with a
    dense upstream gradient as in training (`y.sum()` would hand back a broadcast one)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    _sync(x.device)
    t0 = time.perf_counter()
    y, _ = layer(x)
    y.backward(grad)
    _sync(x.device)
    return (time.perf_counter() - t0) * 1e3


def interleaved_medians(layers: list[Projection], x: torch.Tensor, repeats: int,
                        warmup: int) -> list[float]:
    """Median time of each layer, measured round-robin so that the machine's slow spells (a
    shared VM's neighbours, frequency changes) fall on every variant alike."""
    grads = [torch.randn(x.shape[0], layer.d_out, device=x.device) for layer in layers]
    for _ in range(warmup):
        for layer, grad in zip(layers, grads):
            fwd_bwd_ms(layer, x, grad)
    times: list[list[float]] = [[] for _ in layers]
    for _ in range(repeats):
        for i, (layer, grad) in enumerate(zip(layers, grads)):
            times[i].append(fwd_bwd_ms(layer, x, grad))
    return [statistics.median(t) for t in times]


def equal_flops_width(d: int, target_forward_flops: float) -> int:
    """Output width of a dense d -> w projection whose forward FLOPs match the target."""
    return max(1, round(target_forward_flops / (2.0 * d)))


def run(batch: int = 4096, dim: int = 256, experts: int = 16, top_k: int = 2,
        levels: tuple[int, ...] = (1, 2, 4, 8), device: str = "cpu", repeats: int = 10,
        warmup: int = 3, seed: int = 0) -> list[Row]:
    dev = torch.device(device)
    torch.manual_seed(seed)
    x = torch.randn(batch, dim, device=dev, requires_grad=True)
    cases: list[tuple[str, int, MoEConfig | None, int]] = [("dense", 0, None, dim)]
    for L in levels:
        for variant in (Variant.HILOMOE, Variant.SEQUENTIAL, Variant.FLAT):
            cases.append((variant.value, L,
                          MoEConfig(variant=variant, levels=L, experts=experts, top_k=top_k), dim))
        hilomoe_fwd = projection_cost(dim, dim, MoEConfig(levels=L, experts=experts, top_k=top_k),
                                      RoutingMode.SPARSE, batch).flops
        cases.append(("dense", L, None, equal_flops_width(dim, hilomoe_fwd)))
    cases.append(("dense_experts", 1, MoEConfig(variant=Variant.DENSE_EXPERTS, levels=1,
                                                experts=experts, top_k=top_k), dim))
    layers = []
    for _, _, moe, d_out in cases:
        layer = make_projection(dim, d_out, moe).to(dev)
        layer.mode = RoutingMode.SPARSE
        for name, p in layer.named_parameters():
            if name in ("bank.U", "bank.weight"):  # non-zero experts: no shortcut on zeros
                torch.nn.init.normal_(p, std=0.02)
        layers.append(layer)
    medians = interleaved_medians(layers, x, repeats, warmup)
    rows = []
    for (variant, L, moe, d_out), ms in zip(cases, medians):
        fwd = projection_cost(dim, d_out, moe, RoutingMode.SPARSE, batch).flops
        rows.append(Row(variant, L, moe.experts if moe else 0, batch, dev.type, ms,
                        3.0 * fwd * batch, dim, d_out))
    return rows


def goals(rows: list[Row]) -> dict[str, float]:
    """The issue's targets, as ratios of achieved FLOP rates and of latencies."""
    rate = {(r.variant, r.levels): r.gflops_per_s for r in rows}
    ms = {(r.variant, r.levels): r.ms for r in rows}
    Lmax = max(r.levels for r in rows if r.variant == "hilomoe")
    out = {
        "hilomoe_rate_Lmax_over_L1": rate[("hilomoe", Lmax)] / rate[("hilomoe", 1)],
        "hilomoe_rate_Lmax_over_dense": rate[("hilomoe", Lmax)] / rate[("dense", 0)],
        "hilomoe_ms_Lmax_over_L1": ms[("hilomoe", Lmax)] / ms[("hilomoe", 1)],
        "sequential_ms_Lmax_over_L1": ms[("sequential", Lmax)] / ms[("sequential", 1)],
        "levels_max": Lmax,
    }
    return out


def as_json(rows: list[Row]) -> dict:
    return {
        "rows": [{**asdict(r), "gflops_per_s": r.gflops_per_s} for r in rows],
        "goals": goals(rows),
    }
