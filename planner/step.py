"""One training step of one rank at true shapes on fake tensors (the planner's measurement).

Builds the project's model from the config and the trainer's own engine over it (the torch engine:
`parallelize()`, the optimizer and the LR schedule, as `parallel.engines.build_engine` makes it) on a fake
process group of the full world size, and runs the engine's `train_step` (forward, loss, backward,
gradient clipping and the AdamW step) under torch's memory tracker and the planner's FLOP/collective
counter (planner/runtime.py), which see the step's phases through the engine's `StepHooks`.

Gradient accumulation: the engine disables FSDP gradient sync on all but the last micro-batch, so
the peak is reached on the last one (it carries the unsharded gradient accumulators of the earlier
ones); two micro-batches are therefore run and the counts of the first are scaled to grad_accum - 1.

Pipeline parallelism: a fake process group cannot carry the schedule's sends and receives, so the
hooks replay the configured torch schedule's actions for this rank in its exact order
(`schedule.pipeline_order`; the single-stage schedules' own loops), calling the engine's stage
modules and its loss; the micro-batches the schedule keeps in flight hold their activations at the
same time as on the GPU. Inputs from the previous stage are fresh tensors of the boundary shapes
(what the schedule's receive buffers are), sends/receives are counted from those shapes, and FSDP is
driven the way torch's PipelineStage drives it (no gradient sync or reshard until REDUCE_GRAD).
Every private torch API used here comes from planner/torch_internals.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining.schedules import ScheduleGPipe

from config import Config, ConfigError
from model import LossNorm, Objective, PackedBatch, TransfusionModel
from model.flops import batch_flops
from model.init import local_tensor
from parallel.dims import DistEnv, ParallelDims, mesh_env
from parallel.engine import StepHooks, image_capacity
from parallel.engines import build_engine
from parallel.pipeline import SCHEDULES, stage_ids_for_rank
from trainer.data import build_loader
from trainer.optim import AdamWCosine

from . import torch_internals as ti
from .hardware import GPU, GPUS_PER_NODE
from .runtime import CURRENT_WORK, AttentionWork, CommRecord, Counter, RealShadow, group_dims, plan_attention, to_fake

MEMORY_GROUPS = {
    "parameters": ("Sharded Param", "Unsharded Param", "Buffer", "Parameter"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Gradient"),
    "optimizer": ("OptState", "Optstate"),
    "activations": ("Activation", "Inputs", "Input"),
    "temporaries": ("Temp", "All Gather", "Reduce Scatter"),
}


@dataclass
class RankResult:
    """What one rank's fake step measured."""

    rank: int
    stages: list[int]
    peak_bytes: int
    peak_split: dict[str, int]  # MEMORY_GROUPS and "ema" -> bytes at the peak
    counter: Counter
    attention: AttentionWork
    micro_scale: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    analytic: dict[str, float] = field(default_factory=dict)  # model.flops.batch_flops of the last micro-batch


def _micro_batches(cfg: Config, dp_rank: int, dp: int, n: int) -> list[PackedBatch]:
    loader = build_loader(cfg, dp_rank, dp)
    return [next(loader) for _ in range(n)]


class _Tracker:
    """FSDPMemTracker over every FSDP root of this rank (or MemTracker when nothing is sharded)."""

    def __init__(self, parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.fsdp = all(isinstance(p, FSDPModule) for p in parts)
        if self.fsdp:
            self.t = ti.peak_only(parts[0], optimizer)
            ti.set_root(self.t, parts[0] if len(parts) == 1 else _Roots(parts))
        else:
            self.t = ti.peak_only(None, optimizer)
            self.t.track_external(*parts, optimizer)
        self.optimizer = optimizer

    def __enter__(self) -> "_Tracker":
        self.t.__enter__()
        if self.fsdp:  # AdamW states exist from the warm-up step; attribute them before the measured step.
            ti.track_optimizer_states(self.t, self.optimizer)
        return self

    def __exit__(self, *exc: object) -> None:
        self.t.__exit__(*exc)

    def mark_accumulated_grads(self, parts: list[nn.Module]) -> None:
        """FSDP keeps the unsharded gradients of micro-batches run without gradient sync (the
        trainer's grad_accum, pipeline stages): attribute them to gradients, not temporaries."""
        if not self.fsdp:
            return
        for part in parts:
            for m in part.modules():
                for fp in ti.fsdp_params(m):
                    for t in ti.accumulated_grads(fp):
                        ti.count_as(self.t, t, ti.ACCUMULATED_GRAD)

    def peak(self) -> tuple[int, dict[str, int]]:
        snap = self.t.get_tracker_snapshot("peak")
        dev = next(iter(snap.values())) if snap else {}
        split = {g: sum(int(v) for k, v in dev.items() if str(getattr(k, "value", k)) in names)
                 for g, names in MEMORY_GROUPS.items()}
        return int(dev.get("Total", 0)), split


class _Call(nn.Module):
    """Calls a function as a module: the tracker then sees repeated root calls (micro-batches) as
    nested in one iteration instead of refusing them as a new one."""

    def forward(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        return fn(*args, **kwargs)


_CALL = _Call()


class _Roots(nn.Module):
    """Several FSDP roots (interleaved pipeline stages) seen as one module tree by the tracker."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)


def run_rank(cfg: Config, rank: int, gpu: GPU, attention: str = "plan") -> RankResult:
    """Run one training step of `rank` (cfg.parallel resolved to the world size) on fake tensors.

    attention="plan" stands in for the GPU span kernel; "sdpa" runs the CPU path (for validating
    the fake step against a real CPU step).
    """
    t0 = time.perf_counter()
    p = cfg.parallel
    if p.engine != "torch":
        raise ConfigError(f"the planner rehearses parallel.engine=torch layouts, not parallel.engine={p.engine}")
    dims = ParallelDims.from_config(p)
    cfg = copy.deepcopy(cfg)
    cfg.model.attention = attention
    cfg.parallel = dataclasses.replace(p, meta_init=False, compile=False)
    dist.init_process_group("fake", rank=rank, world_size=dims.world_size, store=ti.FakeStore())
    try:
        with plan_attention() if attention == "plan" else contextlib.nullcontext():
            return _run(cfg, dims, rank, gpu, t0)
    finally:
        dist.destroy_process_group()


def _run(cfg: Config, dims: ParallelDims, rank: int, gpu: GPU, t0: float) -> RankResult:
    env = mesh_env(dims, torch.device("cpu"))
    fake = ti.FakeTensorMode()
    shadow = RealShadow(fake)
    counter = Counter(peak_flops=gpu.bf16_flops, hbm_bw=gpu.hbm_bw, group_dims=group_dims(env.mesh, GPUS_PER_NODE))
    work = AttentionWork(counter)
    n_micro = cfg.train.grad_accum if dims.pp > 1 else min(cfg.train.grad_accum, 2)
    real_batches = _micro_batches(cfg, env.dp_rank, dims.dp, n_micro)
    with fake, shadow:
        torch.manual_seed(cfg.train.seed)
        model = TransfusionModel(cfg.model, cfg.train.seed)
        batches = [dataclasses.replace(b, **{f.name: to_fake(fake, getattr(b, f.name)) for f in dataclasses.fields(b)})
                   for b in real_batches]
        boundary = _boundary_spec(model, cfg, dims, batches[0]) if dims.pp > 1 else None
        with ti.fake_parallelize():
            engine = build_engine(model, cfg, env, AdamWCosine(cfg.optim, cfg.train.steps))
        # A warm-up step creates the AdamW states, as in steady-state training.
        for prm in (prm for part in engine.parts for prm in part.parameters()):
            prm.grad = torch.zeros_like(prm)
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
        tracker = _Tracker(engine.parts, engine.optimizer)
        hooks = _PlanHooks(counter, tracker, env, boundary)
        CURRENT_WORK.append(work)
        try:
            with counter, tracker:
                engine.train_step(batches, 0, hooks)
        finally:
            CURRENT_WORK.pop()
        peak, split = tracker.peak()
        # The EMA weights (train.ema_decay) live through the whole step: this rank's shards add to its peak.
        split["ema"] = sum(local_tensor(t).numel() * t.element_size()
                           for t in (engine.ema.state_dict().values() if engine.ema is not None else ()))
        peak += split["ema"]
    # Not pipelined, 2 of grad_accum micro-batches ran: the first stands for the grad_accum - 1 before the last.
    scale = {"accum": float(cfg.train.grad_accum - 1) if n_micro > 1 else 0.0} if dims.pp == 1 else {}
    analytic = {k: f.total for k, f in batch_flops(cfg.model, real_batches[-1]).items()}
    stages = stage_ids_for_rank(env.mesh["pp"].get_local_rank(), dims.pp, _virtual(cfg)) if dims.pp > 1 else [0]
    return RankResult(rank, stages, peak, split, counter, work, scale, time.perf_counter() - t0, analytic)


class _PlanHooks(StepHooks):
    """The engine's step as the planner watches it: counter phases, module calls seen by the
    memory tracker as nested in one iteration, accumulated gradients attributed, and a pipeline
    schedule replayed action by action (see the module docstring)."""

    def __init__(self, counter: Counter, tracker: _Tracker, env: DistEnv,
                 boundary: list[tuple[tuple[int, ...], torch.dtype]] | None) -> None:
        self.counter, self.tracker, self.env, self.boundary = counter, tracker, env, boundary

    def phase(self, name: str) -> None:
        self.counter.phase = name

    def call(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _CALL(module, *args, **kwargs)

    def after_backward(self, parts: list[nn.Module]) -> None:
        self.tracker.mark_accumulated_grads(parts)

    def run_schedule(self, schedule: Any, loss_fn: Callable, arg_mbs: list | None, kwarg_mbs: list[dict],
                     target_mbs: list | None) -> None:
        A = ti.Computation
        by_index = {s.stage_index: s for s in ti.schedule_stages(schedule)}
        pp_rank = self.env.mesh["pp"].get_local_rank()
        cache: dict[tuple[int, int], tuple] = {}
        nbytes = sum(torch.Size(s).numel() * torch.empty((), dtype=dt).element_size() for s, dt in self.boundary)
        for act in _actions(schedule, len(kwarg_mbs), self.env.dims.pp, pp_rank):
            stage = by_index[act.stage_index]
            mod, mb, kind = stage.submod, act.microbatch_index, act.computation_type
            if kind == A.FORWARD:
                self.phase("forward")
                if stage.is_first:
                    inputs = arg_mbs[mb]
                else:
                    self._p2p("recv", nbytes)
                    inputs = tuple(torch.empty(s, dtype=dt).requires_grad_(True) for s, dt in self.boundary)
                out = self.call(mod, *inputs, **kwarg_mbs[mb])
                if stage.is_last:
                    out = loss_fn(out, target_mbs[mb])
                else:
                    self._p2p("send", nbytes)
                cache[(act.stage_index, mb)] = (out, inputs)
            elif kind in (A.FULL_BACKWARD, A.BACKWARD_INPUT):
                self.phase("backward")
                out, inputs = cache.pop((act.stage_index, mb))
                if isinstance(mod, FSDPModule):
                    mod.set_is_last_backward(False)
                    mod.set_reshard_after_backward(False)
                    mod.set_requires_gradient_sync(False)
                if stage.is_last:
                    out.backward()
                else:
                    self._p2p("recv", nbytes)
                    outs = [o for o in out if o.requires_grad]
                    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
                if not stage.is_first:
                    self._p2p("send", nbytes)
                self.after_backward([mod])
                del out, inputs
            elif kind == A.REDUCE_GRAD:
                self.phase("backward")
                stage.perform_reduce_grad(1)

    def _p2p(self, kind: str, nbytes: int) -> None:
        ranks = dist.get_process_group_ranks(self.env.group("pp"))
        rec = self.counter.comms.setdefault(("pp", kind), CommRecord(
            group_size=len(ranks), intra_node=len({r // GPUS_PER_NODE for r in ranks}) == 1))
        rec.bytes += nbytes
        rec.calls += 1


def _virtual(cfg: Config) -> int:
    return cfg.parallel.pp_virtual_stages if SCHEDULES[cfg.parallel.pp_schedule][1] else 1


def _boundary_spec(model: TransfusionModel, cfg: Config, dims: ParallelDims,
                   batch: PackedBatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes/dtypes of what one pipeline stage sends the next: (h, *U-Net skips padded to capacity)."""
    noisy, t, _ = Objective(cfg.diffusion, cfg.train.seed).inputs(batch, 0, 0)
    with torch.no_grad():
        h, skips = model.embed(batch.tokens, batch.is_image, noisy, t)
    # bf16 runs compute in bf16 parameters in every layout (parallel.parallelize.wraps_fsdp).
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    B, S, d = h.shape
    cap = image_capacity(cfg)
    return [((B, S // dims.tp, d), dtype)] + [((cap, *s.shape[1:]), dtype) for s in skips]


def _actions(schedule: Any, n: int, pp: int, pp_rank: int) -> list:
    """This rank's compute actions in execution order. Multi-stage schedules run their IR
    (`pipeline_order`); the single-stage ones run their own loops, reproduced here (in torch 2.14
    Schedule1F1B's IR is off by one micro-batch on the last stage, its loop is not)."""
    A, Action = ti.Computation, ti.Action
    if isinstance(schedule, ti.PipelineScheduleMulti):
        order = [a for a in schedule.pipeline_order[pp_rank] if a is not None]
        # The runtime adds each stage's REDUCE_GRAD after its last backward when the IR lacks it.
        for stage in {a.stage_index for a in order}:
            if not any(a.computation_type == A.REDUCE_GRAD and a.stage_index == stage for a in order):
                last = max(i for i, a in enumerate(order) if a.stage_index == stage
                           and a.computation_type in (A.FULL_BACKWARD, A.BACKWARD_INPUT, A.BACKWARD_WEIGHT))
                order.insert(last + 1, Action(stage, A.REDUCE_GRAD, None))
        return order
    s = pp_rank
    F = [Action(s, A.FORWARD, i) for i in range(n)]
    B = [Action(s, A.FULL_BACKWARD, i) for i in range(n)]
    if isinstance(schedule, ScheduleGPipe):
        order = F + B
    else:  # 1F1B: warm-up forwards, then one backward + one forward, then the remaining backwards
        warm = min(n, pp - s)
        order, f, b = F[:warm], warm, 0
        while True:
            order.append(B[b])
            b += 1
            if f == n:
                break
            order.append(F[f])
            f += 1
        order += B[b:]
    return order + [Action(s, A.REDUCE_GRAD, None)]
