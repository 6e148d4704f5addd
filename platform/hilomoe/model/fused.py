"""The fused CPU routing kernel (routing_kernel.cpp), compiled on first use and cached.

The routing recurrence is L dependent steps on (B, K) tensors. Eager PyTorch runs each step as a
dozen tiny kernels plus their autograd nodes (about 1 ms per level at B = 4096 on two cores);
the fused kernel runs the whole recurrence, forward and backward, in one pass over the batch.
It serves float32 CPU tensors; everything else (CUDA, where the per-level kernels are cheap,
other dtypes) and any machine where the build fails takes the eager path of routing.py, with
identical results (tests compare them). Set HILOMOE_FUSED_ROUTING=0 to force the eager path.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

_kernel = None
_failed = False
_forced_eager = 0


@contextmanager
def eager():
    """Run routing through plain PyTorch ops inside this block (e.g. to count FLOPs op by op)."""
    global _forced_eager
    _forced_eager += 1
    try:
        yield
    finally:
        _forced_eager -= 1


def kernel():
    """The compiled module, or None where it is disabled or cannot be built here."""
    global _kernel, _failed
    if _kernel is not None or _failed or os.environ.get("HILOMOE_FUSED_ROUTING", "1") == "0":
        return _kernel
    try:
        from torch.utils.cpp_extension import load

        _kernel = _load_built("hilomoe_routing")
        if _kernel is not None:
            return _kernel
        _put_ninja_on_path()
        _drop_stale_lock("hilomoe_routing")
        _kernel = load(
            name="hilomoe_routing",
            sources=[str(Path(__file__).with_name("routing_kernel.cpp"))],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, ...: the eager path still works
        _failed = True
        warnings.warn(f"hilomoe: fused routing kernel unavailable ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); using eager routing",
                      stacklevel=2)
        print("hilomoe: fused routing kernel unavailable; using eager routing", file=sys.stderr)
    return _kernel


STALE_LOCK_S = 180  # a build takes well under a minute; an older lock outlived its builder


def _build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def _load_built(name: str):
    """The module already built from the current source, imported without torch's build lock
    (`load` takes that lock on every call, even when there is nothing to build, so a process
    killed at that moment would leave it behind); None when it must be built."""
    import importlib.util

    try:
        built = _build_dir(name) / f"{name}.so"
        source = Path(__file__).with_name("routing_kernel.cpp")
        if not built.is_file() or built.stat().st_mtime < source.stat().st_mtime:
            return None
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError):
        return None


def _drop_stale_lock(name: str) -> None:
    """torch's build lock is a file that a killed build leaves behind, and every later build
    then waits on it forever: wait while a build may still be running, then remove a lock older
    than any real build."""
    try:
        lock = _build_dir(name) / "lock"
        while lock.exists():
            if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.unlink(missing_ok=True)
                return
            time.sleep(1.0)
    except (ImportError, OSError):
        pass


def _put_ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the pip-installed one lives beside this interpreter,
    which is not on PATH when a venv's scripts are called without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def usable(base: Tensor) -> bool:
    return (not _forced_eager and base.device.type == "cpu" and base.dtype == torch.float32
            and not torch.jit.is_scripting() and kernel() is not None)


class FusedRoute(torch.autograd.Function):
    """(base (B, L, K), gram (LK, LK) or empty) -> logits, soft, gates, selected."""

    @staticmethod
    def forward(ctx, base: Tensor, gram: Tensor, top_k: int, sparse: bool):
        logits, soft, gates, selected = kernel().route_forward(base, gram, top_k, sparse)
        ctx.save_for_backward(logits, soft, gates, selected, gram)
        ctx.sparse = sparse
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(selected)
        return logits, soft, gates, selected

    @staticmethod
    def backward(ctx, g_logits, g_soft, g_gates, _g_selected):
        logits, soft, gates, selected, gram = ctx.saved_tensors
        empty = logits.new_empty(0)
        grad_base, grad_gram = kernel().route_backward(
            empty if g_logits is None else g_logits,
            empty if g_soft is None else g_soft,
            empty if g_gates is None else g_gates,
            logits, soft, gates, selected, gram, ctx.sparse,
        )
        return grad_base, (grad_gram if gram.numel() else None), None, None
