"""Every private torch API the planner relies on, in one place, with the torch version it was checked against.

The planner runs the real training step on fake tensors over a fake process group, and measures it
with torch's own memory tracker; that needs a few of torch's internals (a store for the fake process
group, the FSDP tracker's reference types and bookkeeping, FSDP's per-parameter state, the pipeline
schedules' action IR, the checkpoint recomputation hook, the dispatcher escape hatches) and two
patches that make torch's own code run on fake tensors. They are imported or written only here;
`missing()` names each one this torch no longer has (tests/test_torch_internals.py fails on it
with one line per internal), so a torch upgrade breaks loudly here instead of deep inside a plan.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, _Action, _ComputationType
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import torch.distributed._tools.fake_collectives  # noqa: F401  (fake implementations of the c10d ops)

CHECKED_WITH = "2.14.1"

__all__ = [
    "CHECKED_WITH", "FakeStore", "FakeTensor", "FakeTensorMode", "unset_fake_temporarily", "TorchDispatchMode",
    "_disable_current_modes", "FSDPMemTracker", "MemTracker", "ACCUMULATED_GRAD", "OPTIMIZER_STATE", "Action",
    "Computation", "PipelineScheduleMulti", "missing", "peak_only", "track_optimizer_states", "count_as",
    "set_root", "fsdp_params", "accumulated_grads", "schedule_stages", "recomputing", "flatten_mesh",
    "fake_parallelize",
]

ACCUMULATED_GRAD = _FSDPRefType.UNSHARDED_GRAD
OPTIMIZER_STATE = _FSDPRefType.OPT
Action, Computation = _Action, _ComputationType

# (module, attribute path inside it, what the planner uses it for). An attribute that torch sets on
# instances counts as present when a class on the path declares it (annotation or `self.<name> =`).
INTERNALS: tuple[tuple[str, str, str], ...] = (
    ("torch.testing._internal.distributed.fake_pg", "FakeStore", "the store of the fake process group"),
    ("torch.distributed._tools.fake_collectives", "", "fake c10d collectives"),
    ("torch.distributed._tools.fsdp2_mem_tracker", "_FSDPRefType.UNSHARDED_GRAD", "accumulated gradients"),
    ("torch.distributed._tools.fsdp2_mem_tracker", "_FSDPRefType.OPT", "optimizer states"),
    ("torch.distributed._tools.fsdp2_mem_tracker", "FSDPMemTracker._root_mod", "several FSDP roots"),
    ("torch.distributed._tools.mem_tracker", "MemTracker._update_peak_stats", "peak-only tracking"),
    ("torch.distributed._tools.mem_tracker", "MemTracker._curr_mem_snap", "peak-only tracking"),
    ("torch.distributed._tools.mem_tracker", "MemTracker._peak_mem", "peak-only tracking"),
    ("torch.distributed._tools.mem_tracker", "MemTracker._peak_mem_snap", "peak-only tracking"),
    ("torch.distributed._tools.mem_tracker", "MemTracker._track_optimizer_states", "optimizer states"),
    ("torch.distributed._tools.mem_tracker", "MemTracker._update_and_maybe_create_winfos", "accumulated gradients"),
    ("torch.distributed.fsdp", "FSDPModule._get_fsdp_state", "FSDP's parameter groups"),
    ("torch.distributed.fsdp._fully_shard._fsdp_state", "FSDPState._fsdp_param_groups", "FSDP's parameter groups"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param", "FSDPParam.unsharded_accumulated_grad", "accumulated grads"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param", "FSDPParam._unsharded_param", "accumulated gradients"),
    ("torch.distributed.pipelining.schedules", "_Action", "the pipeline action order"),
    ("torch.distributed.pipelining.schedules", "_ComputationType.REDUCE_GRAD", "the pipeline action order"),
    ("torch.distributed.pipelining.schedules", "PipelineScheduleMulti.pipeline_order", "the pipeline action order"),
    ("torch.distributed.pipelining.schedules", "PipelineScheduleMulti._stages", "a schedule's stages"),
    ("torch.distributed.pipelining.schedules", "PipelineScheduleSingle._stage", "a schedule's stage"),
    ("torch.distributed.pipelining.stage", "_PipelineStageBase.perform_reduce_grad", "REDUCE_GRAD actions"),
    ("torch.distributed.device_mesh", "DeviceMesh._flatten", "the flattened dp mesh"),
    ("torch._C._autograd", "_top_saved_tensors_default_hooks", "recompute phases"),
    ("torch.utils.checkpoint", "_recomputation_hook", "recompute phases"),
    ("torch.utils._python_dispatch", "_disable_current_modes", "counting outside the fake mode"),
    ("torch._subclasses.fake_tensor", "unset_fake_temporarily", "real twins of small tensors"),
)


def _declared(cls: type, name: str) -> bool:
    """`name` is an instance attribute some class of cls's MRO annotates or assigns to self."""
    for k in cls.__mro__:
        if name in getattr(k, "__annotations__", {}):
            return True
        try:
            if f"self.{name} =" in inspect.getsource(k) or f"self.{name}:" in inspect.getsource(k):
                return True
        except (OSError, TypeError):
            continue
    return False


def _resolve(module: str, path: str) -> None:
    """Raises ImportError/AttributeError when `path` does not exist in `module`."""
    obj: Any = importlib.import_module(module)
    for name in path.split(".") if path else []:
        if isinstance(obj, type) and not hasattr(obj, name):
            if _declared(obj, name):
                return
            raise AttributeError(name)
        obj = getattr(obj, name)


def missing() -> list[str]:
    """One line per internal this torch lacks (empty when every one resolves)."""
    out = []
    for module, path, why in INTERNALS:
        try:
            _resolve(module, path)
        except (AttributeError, ImportError) as e:
            name = f"{module}.{path}" if path else module
            out.append(f"torch {torch.__version__} has no {name} ({type(e).__name__}; the planner uses it for {why}; "
                       f"planner/torch_internals.py was checked against torch {CHECKED_WITH})")
    return out


# ---- the memory tracker ---------------------------------------------------------------------------
class _PeakOnly:
    """Keeps only the global peak (and its split): torch's trackers also refresh every module's
    local peak on every op, which the planner does not report and which costs a quarter of a step."""

    def _update_peak_stats(self, peak_state: object) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


class _FSDPPeakTracker(_PeakOnly, FSDPMemTracker):
    pass


class _PeakTracker(_PeakOnly, MemTracker):
    pass


def peak_only(fsdp_root: nn.Module | None, optimizer: torch.optim.Optimizer) -> MemTracker:
    """A tracker that keeps only the peak: FSDPMemTracker over `fsdp_root` and `optimizer`, or a
    MemTracker (the caller registers what it tracks) without a root."""
    return _PeakTracker() if fsdp_root is None else _FSDPPeakTracker(fsdp_root, optimizer)


def set_root(tracker: FSDPMemTracker, root: nn.Module) -> None:
    """Make the FSDP tracker treat `root` (e.g. a holder of several FSDP roots) as its module tree."""
    tracker._root_mod = root


def track_optimizer_states(tracker: MemTracker, optimizer: torch.optim.Optimizer) -> None:
    """Attribute the optimizer's existing states (from a warm-up step) to the optimizer."""
    tracker._track_optimizer_states(OPTIMIZER_STATE, optimizer)


def count_as(tracker: MemTracker, t: torch.Tensor, ref: Any) -> None:
    """Attribute tensor `t` to the tracker's reference type `ref`."""
    tracker._update_and_maybe_create_winfos(t, ref)


# ---- FSDP and pipeline state ----------------------------------------------------------------------
def fsdp_params(module: nn.Module) -> list[Any]:
    """The FSDPParams of an FSDP module (empty for any other module)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    state = get_state() if get_state is not None else None
    groups = getattr(state, "_fsdp_param_groups", None) or []
    return [fp for g in groups for fp in g.fsdp_params]


def accumulated_grads(fp: Any) -> list[torch.Tensor]:
    """The unsharded gradients FSDP keeps for a parameter between micro-batches without sync."""
    param = getattr(fp, "_unsharded_param", None) if hasattr(fp, "_unsharded_param") else None
    return [t for t in (fp.unsharded_accumulated_grad, getattr(param, "grad", None)) if t is not None]


def schedule_stages(schedule: Any) -> list[Any]:
    """The PipelineStages a torch schedule runs on this rank."""
    return list(getattr(schedule, "_stages", None) or [schedule._stage])


def recomputing() -> bool:
    """True inside torch.utils.checkpoint's recomputation (activation checkpointing, chunked CE)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and hooks[0].__qualname__.startswith("_recomputation_hook")


def flatten_mesh(mesh: Any, dims: tuple[str, ...], name: str) -> Any:
    """The 1-D mesh over `dims` of `mesh` (as parallel/dims.py builds the dp mesh)."""
    return mesh[dims]._flatten(name)


# ---- patches that let torch's own code run on fake tensors -----------------------------------------
@contextlib.contextmanager
def _to_same_device_is_noop() -> Iterator[None]:
    """`module.to(device)` of fake parameters already on that device tries to swap each parameter
    with itself and fails in torch 2.14; parallelize() ends with such a call: make it a no-op."""
    orig = nn.Module.to

    def to(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        dev = args[0] if args else kwargs.get("device")
        if isinstance(dev, (str, torch.device)) and all(p.device == torch.device(dev) for p in self.parameters()):
            return self
        return orig(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = orig


@contextlib.contextmanager
def _deepcopy_keeps_fake_mode() -> Iterator[None]:
    """Pipeline stages are deep copies of the model (parallel/pipeline.py); deep-copying a fake
    tensor also deep-copies its FakeTensorMode, and tensors of two modes cannot meet in one op:
    make the copies share this step's mode."""
    had = "__deepcopy__" in FakeTensorMode.__dict__
    orig = FakeTensorMode.__dict__.get("__deepcopy__")
    FakeTensorMode.__deepcopy__ = lambda self, memo: self
    try:
        yield
    finally:
        if had:
            FakeTensorMode.__deepcopy__ = orig
        else:
            del FakeTensorMode.__deepcopy__


@contextlib.contextmanager
def fake_parallelize() -> Iterator[None]:
    """While the engine lays out a fake model: both patches above, undone afterwards."""
    with _to_same_device_is_noop(), _deepcopy_keeps_fake_mode():
        yield
