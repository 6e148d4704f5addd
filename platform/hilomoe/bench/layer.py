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


def time_fwd_bwd(layer: Projection, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median milliseconds of forward + backward (gradients for x and every parameter)."""
    device = x.device
    times = []
    for i in range(warmup + repeats):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        _sync(device)
        t0 = time.perf_counter()
        y, _ = layer(x)
        y.sum().backward()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def equal_flops_width(d: int, target_forward_flops: float) -> int:
    """Output width of a dense d -> w projection whose forward FLOPs match the target."""
    return max(1, round(target_forward_flops / (2.0 * d)))


def run(batch: int = 4096, dim: int = 256, experts: int = 16, top_k: int = 2,
        levels: tuple[int, ...] = (1, 2, 4, 8), device: str = "cpu", repeats: int = 10,
        warmup: int = 3, seed: int = 0) -> list[Row]:
    dev = torch.device(device)
    torch.manual_seed(seed)
    x = torch.randn(batch, dim, device=dev, requires_grad=True)
    rows: list[Row] = []

    def measure(variant: str, L: int, moe: MoEConfig | None, d_out: int = dim) -> None:
        layer = make_projection(dim, d_out, moe).to(dev)
        layer.mode = RoutingMode.SPARSE
        # non-zero up-factors, so no kernel can shortcut on zeros
        for name, p in layer.named_parameters():
            if name in ("bank.U", "bank.weight"):
                torch.nn.init.normal_(p, std=0.02)
        ms = time_fwd_bwd(layer, x, repeats, warmup)
        fwd = projection_cost(dim, d_out, moe, RoutingMode.SPARSE, batch).flops
        rows.append(Row(variant, L, moe.experts if moe else 0, batch, dev.type, ms,
                        3.0 * fwd * batch, dim, d_out))

    measure("dense", 0, None)
    for L in levels:
        for variant in (Variant.HILOMOE, Variant.SEQUENTIAL, Variant.FLAT):
            measure(variant.value, L, MoEConfig(variant=variant, levels=L, experts=experts,
                                                top_k=top_k))
        hilomoe_fwd = projection_cost(dim, dim, MoEConfig(levels=L, experts=experts, top_k=top_k),
                                      RoutingMode.SPARSE, batch).flops
        measure("dense", L, None, equal_flops_width(dim, hilomoe_fwd))
    measure("dense_experts", 1, MoEConfig(variant=Variant.DENSE_EXPERTS, levels=1,
                                          experts=experts, top_k=top_k))
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
