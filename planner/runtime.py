"""Machinery for the planner's fake-mode training step (planner/plan.py).

Fake tensors carry shapes and no data, so three things need help to run the project's real code:
- `RealShadow` keeps a real copy of every small integer/bool tensor (tokens, spans, masks, targets)
  next to its fake twin, so data-dependent shapes (`h[is_image]`, `int(mask.sum())`) resolve to the
  batch's true values;
- the `plan` attention backend stands in for the GPU span kernel: it allocates exactly what the
  Triton kernel allocates and saves (out, LSE; delta, fp32 dQ in backward) and records the work the
  kernel does from the batch's spans, because the CPU SDPA path would materialise a dense S x S mask;
- `Counter` records matmul/conv FLOPs per phase (with a per-op roofline time for a named GPU) and
  bytes of every collective per mesh dimension.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

from kernels.dispatch import register_backend, unregister_backend
from kernels.spans import key_block_bounds, query_block_bounds
from kernels.triton_span import default_blocks
from model.flops import span_pairs

from .torch_internals import (
    FakeTensor, FakeTensorMode, TorchDispatchMode, _disable_current_modes, flatten_mesh, recomputing,
    unset_fake_temporarily,
)

aten = torch.ops.aten
_SHADOW_DTYPES = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_SHADOW_MAX_NUMEL = 1 << 22
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default,
                   aten.item.default, aten.unique_consecutive.default, aten._unique2.default}


def real_of(t: object) -> torch.Tensor | None:
    """The real twin of a fake tensor, when it has one."""
    return getattr(t, "_plan_real", None) if isinstance(t, torch.Tensor) else None


def to_fake(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    """A fake copy of a real tensor; integer/bool tensors keep their real values as a shadow."""
    fake = mode.from_tensor(t)
    if t.dtype in _SHADOW_DTYPES:
        fake._plan_real = t
    return fake


class RealShadow(TorchDispatchMode):
    """Runs ops on the real twins of small integer/bool fake tensors alongside the fake ops.

    Sits above a FakeTensorMode. An op whose tensor inputs all have twins is also run for real; a
    data-dependent op (nonzero, item, boolean indexing) then takes its shape from the real result.
    Boolean indices with twins are turned into integer indices. A float `.item()` without a twin
    (e.g. a clipping coefficient) returns 1.0: values never matter in a plan, shapes do.
    """

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():  # real bookkeeping tensors (device-mesh layouts) stay real
                return func(*args, **kwargs)
        if any(not isinstance(t, FakeTensor) for t in tensors):  # a real constant meets fake tensors
            args, kwargs = tree_map(
                lambda a: to_fake(self.fake_mode, a) if isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor)
                else a, (args, kwargs))
            flat, _ = tree_flatten((args, kwargs))
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if tensors and all(real_of(t) is not None for t in tensors):
            return self._shadowed(func, args, kwargs)
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            args = self._int_indices(args)
        elif func is aten.masked_select.default and real_of(args[1]) is not None:
            return self(aten.index.Tensor, (args[0], [args[1]]))
        elif func in (aten._local_scalar_dense.default, aten.item.default):
            if args[0].dtype.is_floating_point:
                return 1.0
            if args[0].dtype == torch.bool:  # e.g. "is the loss finite": the step goes on as if it were
                return True
        out = func(*args, **kwargs)
        if not tensors and _shadowable(out):  # small integer factories (arange, zeros): twin them
            with unset_fake_temporarily():
                real = func(*args, **kwargs)
            _attach(out, real)
        return out

    def __call__(self, func, args):  # noqa: ANN001, ANN204
        return self.__torch_dispatch__(func, (), args, {})

    def _shadowed(self, func, args, kwargs):  # noqa: ANN001, ANN202
        real_args, real_kwargs = tree_map(lambda a: real_of(a) if isinstance(a, torch.Tensor) else a, (args, kwargs))
        with unset_fake_temporarily():
            real = func(*real_args, **real_kwargs)
        if func in _DATA_DEPENDENT:
            if not isinstance(real, torch.Tensor):
                return real
            fake = self.fake_mode.from_tensor(real)
        else:
            fake = func(*args, **kwargs)
        _attach(fake, real)
        return fake

    def _int_indices(self, args: tuple) -> tuple:
        indices = list(args[1])
        for i, ix in enumerate(indices):
            real = real_of(ix)
            if real is not None and real.dtype == torch.bool:
                with unset_fake_temporarily():
                    parts = real.nonzero().unbind(1)
                indices[i:i + 1] = [to_fake(self.fake_mode, p) for p in parts]
                return self._int_indices((args[0], indices, *args[2:]))
        return (args[0], indices, *args[2:])


def _shadowable(out: object) -> bool:
    return isinstance(out, FakeTensor) and out.dtype in _SHADOW_DTYPES and out.numel() <= _SHADOW_MAX_NUMEL


def _attach(fake: object, real: object) -> None:
    f_flat, _ = tree_flatten(fake)
    r_flat, _ = tree_flatten(real)
    for f, r in zip(f_flat, r_flat):
        if isinstance(f, torch.Tensor) and isinstance(r, torch.Tensor) and f.dtype in _SHADOW_DTYPES:
            f._plan_real = r


# ---------------------------------------------------------------------------------------------
# Attention stand-in with the span kernel's allocations and work.


@dataclass
class AttentionWork:
    """Span-attention work of the step per counter phase: {(phase, "fwd"|"bwd"): [pairs, tile elements]}
    x local heads; `pairs` are (query, key) pairs inside the spans, tiles what the kernel computes."""

    counter: "Counter | None" = None
    calls: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    head_dim: int = 0

    def phase(self) -> str:
        if self.counter is None:
            return "forward"
        ph = self.counter.phase
        return ph.replace("backward", "recompute") if ph.startswith("backward") and recomputing() else ph

    def flops(self, phases: dict[str, float]) -> dict[str, float]:
        """Model FLOPs (span pairs; forward calls of recompute phases excluded) and kernel FLOPs
        (whole tiles; the backward recomputes P: 5 matmuls vs 2), weighting phase p by phases[p]."""
        D, out = self.head_dim, {"model_fwd": 0.0, "model_bwd": 0.0, "kernel_fwd": 0.0, "kernel_bwd": 0.0}
        for (ph, kind), (pairs, tiles) in self.calls.items():
            w = phases.get(ph, 0.0)
            if kind == "fwd":
                out["kernel_fwd"] += w * 4.0 * tiles * D
                if not ph.startswith("recompute"):
                    out["model_fwd"] += w * 4.0 * pairs * D
            else:
                out["kernel_bwd"] += w * 10.0 * tiles * D
                out["model_bwd"] += w * 8.0 * pairs * D
        return out


class _PlanAttention(torch.autograd.Function):
    """Allocates and saves what kernels/triton_span.SpanAttentionFunction does; computes nothing."""

    @staticmethod
    def forward(ctx, q, k, v, lo, hi, work):  # noqa: ANN001, ANN205
        B, S, H, D = q.shape
        out = torch.empty_like(q)
        lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, lo, hi)
        ctx.work, ctx.spans = work, (real_of(lo), real_of(hi))
        _record(work, q, k, *ctx.spans, backward=False)
        return out

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001, ANN205
        q, k, v, out, lse, lo, hi = ctx.saved_tensors
        B, S, H, D = q.shape
        delta = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dq32 = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # atomic dQ accumulator
        dq = dq32.to(q.dtype)
        del delta, dq32
        _record(ctx.work, q, k, *ctx.spans, backward=True)
        return dq, dk, dv, None, None, None


def _record(work: "AttentionWork | None", q, k, rlo, rhi, backward: bool) -> None:  # noqa: ANN001
    if work is None:
        return
    if rlo is None or rhi is None:
        raise RuntimeError("plan attention: spans without real values")
    with _disable_current_modes():
        _count(work, q.shape, k.shape[1], rlo, rhi, backward)


def _count(work: AttentionWork, q_shape: torch.Size, n_keys: int, rlo, rhi, backward: bool) -> None:  # noqa: ANN001
    B, S, H, D = q_shape
    blocks = default_blocks(D, torch.bfloat16)
    pairs = int(span_pairs(rlo, rhi)) * H
    if backward:
        kb = key_block_bounds(rlo, rhi, blocks.bwd_m, blocks.bwd_n, n_keys)
        tiles = int((kb[..., 3] - kb[..., 0]).clamp(min=0).sum()) * blocks.bwd_m * blocks.bwd_n * H
    else:
        qb = query_block_bounds(rlo, rhi, blocks.fwd_m, blocks.fwd_n)
        tiles = int((qb[..., 3] - qb[..., 0]).clamp(min=0).sum()) * blocks.fwd_m * blocks.fwd_n * H
    rec = work.calls.setdefault((work.phase(), "bwd" if backward else "fwd"), [0, 0])
    rec[0] += pairs
    rec[1] += tiles
    work.head_dim = D


CURRENT_WORK: list[AttentionWork] = []


def plan_span_attention(q, k, v, kv_lo, kv_hi, scale=None):  # noqa: ANN001, ANN201
    """The `plan` attention backend (registered only while a planned step runs: `plan_attention`)."""
    return _PlanAttention.apply(q, k, v, kv_lo, kv_hi, CURRENT_WORK[-1] if CURRENT_WORK else None)


@contextlib.contextmanager
def plan_attention() -> Iterator[None]:
    """Make the `plan` backend nameable for the duration of a planned step, then remove it, so the
    trainer's registry (and `auto`'s order) never holds the planner's stand-in."""
    register_backend("plan", plan_span_attention, lambda q, kv_lo=None, kv_hi=None: None, 99, ("meta",))
    try:
        yield
    finally:
        unregister_backend("plan")


# ---------------------------------------------------------------------------------------------
# FLOPs, roofline time and collective bytes.

_COLLECTIVES = {
    "all_gather": ("allgather_", "_allgather_base_", "allgather_into_tensor_coalesced_", "all_gather_into_tensor",
                   "all_gather_into_tensor_out", "all_gather_into_tensor_coalesced"),
    "reduce_scatter": ("reduce_scatter_", "_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_",
                       "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"),
    "all_reduce": ("allreduce_", "allreduce_coalesced_", "all_reduce", "all_reduce_coalesced"),
    "all_to_all": ("alltoall_", "alltoall_base_", "all_to_all_single"),
    "broadcast": ("broadcast_",),
}
_KIND_OF = {name: kind for kind, names in _COLLECTIVES.items() for name in names}


@dataclass
class CommRecord:
    bytes: int = 0  # bytes of the full buffer (all-gather output, reduce-scatter input, all-reduce tensor)
    calls: int = 0
    group_size: int = 1
    intra_node: bool = True


@dataclass
class PhaseStats:
    flops: int = 0  # matmul / conv FLOPs (local)
    time_s: float = 0.0  # per-op roofline time on the chosen GPU
    bytes: int = 0  # bytes read + written by all ops


@dataclass
class Counter(TorchDispatchMode):
    """Counts local FLOPs, roofline time and collectives per phase and mesh dimension."""

    peak_flops: float = 1.0
    hbm_bw: float = 1.0
    group_dims: dict[str, tuple[str, int, bool]] = field(default_factory=dict)  # group name -> (dim, size, intra)
    phase: str = "forward"
    phases: dict[str, PhaseStats] = field(default_factory=lambda: defaultdict(PhaseStats))
    comms: dict[tuple[str, str], CommRecord] = field(default_factory=dict)  # (dim, kind) -> record
    comms_accum: dict[tuple[str, str], CommRecord] = field(default_factory=dict)  # of *_accum phases
    comms_clip: dict[tuple[str, str], CommRecord] = field(default_factory=dict)  # gradient clipping (not overlapped)
    op_time: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # roofline seconds per op
    calls_by_phase: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # collectives per phase

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in _KIND_OF:
            self._comm(_KIND_OF[name], args, kwargs, out)
            return out
        phase = self.phase.replace("backward", "recompute") if self.phase.startswith("backward") and recomputing() \
            else self.phase
        st = self.phases[phase]
        moved = _moved_bytes(func, args, kwargs, out)
        flops = 0
        packet = func._overloadpacket
        if packet in flop_registry:
            shapes = tree_map(lambda a: a.shape if isinstance(a, torch.Tensor) else a, (args, kwargs))
            out_shape = tree_map(lambda a: a.shape if isinstance(a, torch.Tensor) else a, out)
            flops = int(flop_registry[packet](*shapes[0], **shapes[1], out_val=out_shape))
        st.flops += flops
        st.bytes += moved
        t = max(flops / self.peak_flops, moved / self.hbm_bw)
        st.time_s += t
        self.op_time[func._overloadpacket.__name__] += t
        return out

    def _comm(self, kind: str, args: tuple, kwargs: dict, out: object) -> None:
        flat, _ = tree_flatten((args, kwargs))
        dim, size, intra = "world", 1, True
        for a in flat:
            name = _group_name(a)
            if name is not None and name in self.group_dims:
                dim, size, intra = self.group_dims[name]
                break
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if kind == "all_gather":
            nbytes = max(_nbytes(out), max((t.numel() * t.element_size() for t in tensors), default=0))
            if name_is_functional(args) and isinstance(out, torch.Tensor):
                nbytes = out.numel() * out.element_size()
        elif kind == "reduce_scatter":
            nbytes = max((t.numel() * t.element_size() for t in tensors), default=0)
        else:
            nbytes = _nbytes(args[0]) if args else 0
        book = (self.comms_accum if self.phase.endswith("_accum") else
                self.comms_clip if self.phase == "clip" else self.comms)
        rec = book.setdefault((dim, kind), CommRecord(group_size=size, intra_node=intra))
        rec.bytes += nbytes
        rec.calls += 1
        self.calls_by_phase[self.phase] += 1


_NO_TRAFFIC = ("empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided", "detach", "alias",
               "_unsafe_view", "lift_fresh", "set_", "resize_", "record_stream", "wait_tensor")


def _moved_bytes(func, args: tuple, kwargs: dict, out: object) -> int:  # noqa: ANN001
    """HBM bytes an op reads and writes: none for views and allocations; an in-place op's output
    is its input (counted once)."""
    name = func._overloadpacket.__name__
    if func.namespace not in ("aten", "fsdp") or func.is_view or name in _NO_TRAFFIC:
        return 0  # metadata queries (prim.device, ...), views, allocations
    read = _nbytes((args, kwargs))
    return read if name.endswith("_") else read + _nbytes(out)


def name_is_functional(args: tuple) -> bool:
    return any(isinstance(a, str) for a in args)


def _group_name(a: object) -> str | None:
    if isinstance(a, str):
        return a
    if isinstance(a, torch.ScriptObject):
        try:
            return dist.ProcessGroup.unbox(a).group_name
        except Exception:  # noqa: BLE001 - not a process group
            return None
    return None


def _nbytes(tree: object) -> int:
    flat, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def group_dims(mesh, gpus_per_node: int) -> dict[str, tuple[str, int, bool]]:  # noqa: ANN001
    """Process-group name -> (mesh dim, group size, whether its ranks share a node).

    The flattened dp group is labelled "dp"; when it is a separate group over the same ranks as a mesh
    dimension's (dp_replicate = 1 beside tp or pp), it reports under that dimension."""
    out: dict[str, tuple[str, int, bool]] = {}
    by_ranks: dict[tuple[int, ...], str] = {}
    names = list(mesh.mesh_dim_names)
    candidates = [(n, mesh[n]) for n in names]
    candidates.append(("dp", flatten_mesh(mesh, ("dp_replicate", "dp_shard"), "dp")))
    for label, sub in candidates:
        group = sub.get_group()
        ranks = tuple(dist.get_process_group_ranks(group))
        intra = len({r // gpus_per_node for r in ranks}) == 1
        if group.group_name not in out and ranks in by_ranks:
            label = by_ranks[ranks]
        by_ranks.setdefault(ranks, label)
        out[group.group_name] = (label, len(ranks), intra)
    return out


def ring_bytes(kind: str, nbytes: int, n: int) -> float:
    """Bytes each rank sends for a ring collective over n ranks."""
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if kind in ("send", "recv"):
        return float(nbytes)
    return (n - 1) / n * nbytes


