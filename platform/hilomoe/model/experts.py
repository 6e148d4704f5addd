"""Expert banks: all levels' rank-r LoRA experts as two flat matrices, and full-rank experts.

A LoRA expert (l, k) of a d_in -> d_out projection is U_l[k] V_l[k] with V_l[k]: (r, d_in) and
U_l[k]: (d_out, r). The bank stores every level's factors row-wise in one matrix each,

    V: (L*K*r, d_in)    row (l*K + k)*r + j  =  V_l[k][j]
    U: (L*K*r, d_out)   row (l*K + k)*r + j  =  U_l[k][:, j]      (zero-initialised)

so that the down-projection of all experts of all levels is ONE matmul x V^T and the combination
sum_l sum_{k in TopK} s_l[k] U_l[k] (V_l[k] x) is one sparse product over the selected rows.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _SparseRowsProduct(torch.autograd.Function):
    """y[b] = sum_j coef[b, j] * table[rows[b, j]]  ->  (B, d_out).

    Forward is `embedding_bag` (it touches only the selected rows: 2*B*n*d_out FLOPs). Its own
    backward scatters row by row, which on CPU costs 30x the forward; the two matmuls below do the
    same job through dense BLAS (grad_coef = (g table^T) at rows; grad_table = onehot(coef)^T g).
    """

    @staticmethod
    def forward(ctx, coef: Tensor, rows: Tensor, table: Tensor) -> Tensor:
        ctx.save_for_backward(coef, rows, table)
        return F.embedding_bag(rows, table, per_sample_weights=coef.to(table.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        coef, rows, table = ctx.saved_tensors
        grad = grad.to(table.dtype).contiguous()
        grad_coef = _selected_dots(grad, table, rows).to(coef.dtype)
        dense_coef = grad.new_zeros(grad.shape[0], table.shape[0]).scatter_add_(
            1, rows, coef.to(table.dtype)
        )
        return grad_coef, None, dense_coef.T @ grad


def _selected_dots(grad: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """(grad table^T)[b, rows[b, j]] -> (B, n), computing only those entries when it can.

    Rows ascending in every sample form a CSR pattern (the fused router emits them so), and
    `sampled_addmm` then computes just the B*n needed dot products instead of all B*R.
    """
    B, n = rows.shape
    if grad.device.type == "cpu" and n > 1 and bool((rows[:, 1:] > rows[:, :-1]).all()):
        crow = torch.arange(0, B * n + 1, n, device=rows.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(crow, rows.reshape(-1), grad.new_zeros(B * n),
                                              size=(B, table.shape[0]))
        return torch.sparse.sampled_addmm(pattern, grad, table.T, beta=0.0).values().view(B, n)
    return (grad @ table.T).gather(1, rows)


def sparse_rows_product(coef: Tensor, rows: Tensor, table: Tensor) -> Tensor:
    """coef, rows: (B, n); table: (R, d_out) -> (B, d_out) = sum_j coef[:, j] table[rows[:, j]]."""
    return _SparseRowsProduct.apply(coef, rows, table)


class LoRAExperts(nn.Module):
    """L levels x K experts of rank r for a d_in -> d_out projection (parameters only + products).

    >>> bank = LoRAExperts(d_in=16, d_out=8, levels=2, experts=4, rank=1)
    >>> bank.down(torch.randn(3, 16)).shape     # (B, L, K, r)
    torch.Size([3, 2, 4, 1])
    """

    def __init__(self, d_in: int, d_out: int, levels: int, experts: int, rank: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.levels, self.experts, self.rank = levels, experts, rank
        rows = levels * experts * rank
        # Keys double as router keys: entries ~ N(0, 1) give routing logits of order one
        # (q . k / sqrt(d) with unit-variance entries), like attention's query-key products.
        self.V = nn.Parameter(torch.randn(rows, d_in))
        self.U = nn.Parameter(torch.zeros(rows, d_out))  # zero: a new bank is the base model

    def keys(self) -> Tensor:
        """Router keys, one per expert: its first down-projection row.  -> (L, K, d_in)."""
        return self.V.view(self.levels, self.experts, self.rank, self.d_in)[:, :, 0]

    def down(self, x: Tensor) -> Tensor:
        """All experts' down-projections V_l[k] x.  x: (B, d_in) -> (B, L, K, r)."""
        return (x @ self.V.T).view(-1, self.levels, self.experts, self.rank)

    def up_dense(self, coef: Tensor, first_level: int = 0) -> Tensor:
        """sum over every expert of levels first_level.. of U_l[k] coef[l, k].

        coef: (B, L', K, r) -> (B, d_out).
        """
        per_level = self.experts * self.rank
        start = first_level * per_level
        return coef.flatten(1) @ self.U[start : start + coef.shape[1] * per_level]

    def up_sparse(self, coef: Tensor, topk: Tensor, first_level: int = 0) -> Tensor:
        """sum over the selected experts of levels first_level.. only.

        coef: (B, L', k, r), topk: (B, L', k) expert indices within each level -> (B, d_out).
        """
        B, L, k, r = coef.shape
        level = torch.arange(first_level, first_level + L, device=topk.device)
        level_base = level.view(1, L, 1) * self.experts
        rows = ((topk + level_base) * r).unsqueeze(-1) + torch.arange(r, device=topk.device)
        return sparse_rows_product(coef.reshape(B, -1), rows.reshape(B, -1), self.U)

    def mixture_reference(self, x: Tensor, scores: Tensor) -> Tensor:
        """sum_l sum_k s_l[k] U_l[k] (V_l[k] x), one expert at a time (for tests).

        x: (B, d_in), scores: (B, L, K) -> (B, d_out).
        """
        V = self.V.view(self.levels, self.experts, self.rank, self.d_in)
        U = self.U.view(self.levels, self.experts, self.rank, self.d_out)
        out = x.new_zeros(x.shape[0], self.d_out)
        for l in range(self.levels):
            for k in range(self.experts):
                out = out + scores[:, l, k, None] * ((x @ V[l, k].T) @ U[l, k])
        return out


class FullRankExperts(nn.Module):
    """K full-rank d_in -> d_out experts of a classic (Switch/GShard-style) MoE; zero-initialised.

    weight: (K, d_in, d_out). Dense mode multiplies by every expert; sparse mode groups the
    (sample, slot) pairs by expert, so each expert multiplies only the rows routed to it.
    """

    def __init__(self, d_in: int, d_out: int, experts: int):
        super().__init__()
        self.d_in, self.d_out, self.experts = d_in, d_out, experts
        self.weight = nn.Parameter(torch.zeros(experts, d_in, d_out))

    def dense(self, x: Tensor, scores: Tensor) -> Tensor:
        """x: (B, d_in), scores: (B, K) -> (B, d_out) = sum_k scores[:, k] x W_k."""
        per_expert = torch.einsum("bi,kio->bko", x, self.weight)
        return torch.einsum("bk,bko->bo", scores, per_expert)

    def sparse(self, x: Tensor, gates: Tensor, topk: Tensor) -> Tensor:
        """x: (B, d_in), gates, topk: (B, k) -> (B, d_out) = sum_j gates[:, j] x W_{topk[:, j]}."""
        B, k = topk.shape
        flat = topk.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.experts).tolist()
        sample = order // k
        xs = x.index_select(0, sample)
        outs = [
            chunk @ self.weight[e] for e, chunk in enumerate(xs.split(counts)) if counts[e]
        ]
        ys = torch.cat(outs) * gates.reshape(-1)[order, None]
        return x.new_zeros(B, self.d_out).index_add(0, sample, ys.to(x.dtype))

