"""One training step of one rank at true shapes on fake tensors (the planner's measurement).

Builds the project's model from the config, applies the project's `parallelize()` on a fake process
group of the full world size, and runs forward, loss, backward, gradient clipping and the AdamW step
under torch's memory tracker and the planner's FLOP/collective counter (planner/runtime.py).

Gradient accumulation: the trainer disables FSDP gradient sync on all but the last micro-batch, so
the peak is reached on the last one (it carries the unsharded gradient accumulators of the earlier
ones); two micro-batches are therefore run and the counts of the first are scaled to grad_accum - 1.

Pipeline parallelism: the stages of this rank are run in the exact action order the configured
torch schedule gives this rank (`schedule.pipeline_order`), so the micro-batches the schedule keeps in
flight hold their activations at the same time as on the GPU; inputs from the previous stage are
fresh tensors of the boundary shapes (what the schedule's receive buffers are), sends/receives are
counted from those shapes, and FSDP is driven the way torch's PipelineStage drives it (no gradient
sync or reshard until the REDUCE_GRAD action).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from config import Config
from model import LossNorm, ModelOutput, NoiseSchedule, PackedBatch, TransfusionModel, transfusion_loss
from parallel.dims import MESH_DIMS, DistEnv, ParallelDims
from parallel.engine import image_capacity
from parallel.grad_clip import clip_grad_norm
from parallel.parallelize import parallelize
from parallel.pipeline import SCHEDULES, stage_ids_for_rank
from model.flops import batch_flops
from .hardware import GPU, GPUS_PER_NODE
from trainer.data import build_loader
from trainer.optim import build_optimizer_for

from .runtime import CURRENT_WORK, AttentionWork, Counter, RealShadow, group_dims, plan_attention, to_fake

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
    peak_split: dict[str, int]  # MEMORY_GROUPS -> bytes at the peak
    counter: Counter
    attention: AttentionWork
    micro_scale: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    analytic: dict[str, float] = field(default_factory=dict)  # model.flops.batch_flops of the last micro-batch


def _micro_batches(cfg: Config, dp_rank: int, dp: int, n: int) -> list[PackedBatch]:
    loader = build_loader(cfg, dp_rank, dp)
    return [next(loader) for _ in range(n)]


def _env(dims: ParallelDims, rank: int) -> DistEnv:
    mesh = init_device_mesh("cpu", (dims.dp_replicate, dims.dp_shard, dims.pp, dims.tp), mesh_dim_names=MESH_DIMS)
    dp_mesh = mesh[("dp_replicate", "dp_shard")]._flatten("dp")
    return DistEnv(dims, mesh, torch.device("cpu"), rank, dp_mesh.get_local_rank(), dp_mesh)


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


class _Tracker:
    """FSDPMemTracker over every FSDP root of this rank (or MemTracker when nothing is sharded)."""

    def __init__(self, parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        if all(isinstance(p, FSDPModule) for p in parts):
            self.t = _FSDPPeakTracker(parts[0], optimizer)
            self.t._root_mod = parts[0] if len(parts) == 1 else _Roots(parts)
        else:
            self.t = _PeakTracker()
            self.t.track_external(*parts, optimizer)
        self.optimizer = optimizer

    def __enter__(self) -> "_Tracker":
        self.t.__enter__()
        # AdamW states exist from the warm-up step; attribute them before the measured step.
        ref = _FSDPRefType.OPT if isinstance(self.t, FSDPMemTracker) else None
        if ref is not None:
            self.t._track_optimizer_states(ref, self.optimizer)
        return self

    def __exit__(self, *exc: object) -> None:
        self.t.__exit__(*exc)

    def mark_accumulated_grads(self, parts: list[nn.Module]) -> None:
        """FSDP keeps the unsharded gradients of micro-batches run without gradient sync (the
        trainer's grad_accum, pipeline stages): attribute them to gradients, not temporaries."""
        if not isinstance(self.t, FSDPMemTracker):
            return
        for part in parts:
            for m in part.modules():
                state = m._get_fsdp_state() if isinstance(m, FSDPModule) else None
                group = state._fsdp_param_group if state is not None else None
                for fp in group.fsdp_params if group is not None else []:
                    for t in (fp.unsharded_accumulated_grad, getattr(fp._unsharded_param, "grad", None)
                              if hasattr(fp, "_unsharded_param") else None):
                        if t is not None:
                            self.t._update_and_maybe_create_winfos(t, _FSDPRefType.UNSHARDED_GRAD)

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


@contextlib.contextmanager
def _to_same_device_is_noop():  # noqa: ANN202
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
def _deepcopy_keeps_fake_mode():  # noqa: ANN202
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


def run_rank(cfg: Config, rank: int, gpu: GPU, attention: str = "plan") -> RankResult:
    """Run one training step of `rank` (cfg.parallel resolved to the world size) on fake tensors.

    attention="plan" stands in for the GPU span kernel; "sdpa" runs the CPU path (for validating
    the fake step against a real CPU step).
    """
    t0 = time.perf_counter()
    p = cfg.parallel
    dims = ParallelDims.from_config(p)
    cfg = copy.deepcopy(cfg)
    cfg.model.attention = attention
    cfg.parallel = dataclasses.replace(p, meta_init=False, compile=False)
    dist.init_process_group("fake", rank=rank, world_size=dims.world_size, store=FakeStore())
    try:
        with plan_attention() if attention == "plan" else contextlib.nullcontext():
            return _run(cfg, dims, rank, gpu, t0)
    finally:
        dist.destroy_process_group()


def _run(cfg: Config, dims: ParallelDims, rank: int, gpu: GPU, t0: float) -> RankResult:
    env = _env(dims, rank)
    fake = FakeTensorMode()
    shadow = RealShadow(fake)
    counter = Counter(peak_flops=gpu.bf16_flops, hbm_bw=gpu.hbm_bw, group_dims=group_dims(env.mesh, GPUS_PER_NODE))
    work = AttentionWork(counter)
    n_micro = cfg.train.grad_accum if dims.pp > 1 else min(cfg.train.grad_accum, 2)
    real_batches = _micro_batches(cfg, env.dp_rank, dims.dp, n_micro)
    schedule = NoiseSchedule(cfg.diffusion)
    noised = []
    for i, b in enumerate(real_batches):
        gen = torch.Generator().manual_seed(cfg.train.seed * 1009 + i)
        noised.append(schedule.sample_training_inputs(b.latents, b.image_max_t, gen))
    norm = LossNorm(sum(b.num_text_tokens() for b in real_batches) * dims.dp,
                    sum(b.num_images for b in real_batches) * dims.dp)
    with fake, shadow:
        torch.manual_seed(cfg.train.seed)
        model = TransfusionModel(cfg.model)
        boundary = _boundary_spec(model, cfg, dims, fake, real_batches[0], noised[0]) if dims.pp > 1 else None
        lw = cfg.diffusion.loss_weight

        def pipeline_loss(outputs: tuple, targets: torch.Tensor) -> torch.Tensor:
            """The torch engine's pipeline loss without its bookkeeping: the last stage returns
            (final-normed hidden, noise_pred, noise); the LM head is read at text targets only."""
            hidden, noise_pred, noise = outputs
            head = next(part.output for part in pm.parts if part.is_last)  # pm: bound below, before any call
            out = ModelOutput(noise_pred=noise_pred, hidden=hidden, head=head)
            return transfusion_loss(out, targets, noise, lw, norm).total * dims.dp

        with _to_same_device_is_noop(), _deepcopy_keeps_fake_mode():
            pm = parallelize(model, env, cfg.parallel, cfg.train.dtype, cfg.train.grad_accum, image_capacity(cfg),
                             pipeline_loss)
        params = list(pm.parameters())
        optimizer = build_optimizer_for(params, cfg.optim)
        for prm in params:  # warm-up step: creates the AdamW states, as in steady-state training
            prm.grad = torch.zeros_like(prm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batches = [dataclasses.replace(b, **{f.name: to_fake(fake, getattr(b, f.name)) for f in dataclasses.fields(b)})
                   for b in real_batches]
        noised = [tuple(to_fake(fake, t) for t in n) for n in noised]
        tracker = _Tracker(pm.parts, optimizer)
        bf16 = cfg.train.dtype == "bf16"
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        loss_ctx = loss_parallel if pm.loss_parallel else contextlib.nullcontext
        ctx = _StepContext(pm, env, cfg, batches, noised, norm, counter, tracker, autocast, loss_ctx, pipeline_loss)
        CURRENT_WORK.append(work)
        try:
            with counter, tracker:
                if pm.schedule is not None:
                    _pipeline_step(ctx, boundary)
                    scale = {}
                else:
                    scale = _plain_step(ctx)
                counter.phase = "clip"
                clip_grad_norm(pm.parameters(), cfg.optim.grad_clip or float("inf"),
                               env.group("pp") if dims.pp > 1 else None)
                counter.phase = "optimizer"
                optimizer.step()
        finally:
            CURRENT_WORK.pop()
        peak, split = tracker.peak()
    analytic = {k: f.total for k, f in batch_flops(cfg.model, real_batches[-1]).items()}
    stages = stage_ids_for_rank(env.mesh["pp"].get_local_rank(), dims.pp, _virtual(cfg)) if dims.pp > 1 else [0]
    return RankResult(rank, stages, peak, split, counter, work, scale, time.perf_counter() - t0, analytic)


@dataclass
class _StepContext:
    """Everything one measured step needs."""

    pm: object  # ParallelModel
    env: DistEnv
    cfg: Config
    batches: list[PackedBatch]
    noised: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (noisy latents, t, noise) per micro-batch
    norm: LossNorm
    counter: Counter
    tracker: _Tracker
    autocast: torch.autocast
    loss_ctx: object  # () -> context manager (loss_parallel under tensor parallelism)
    pipeline_loss: object  # the trainer's pipeline loss function


def _virtual(cfg: Config) -> int:
    return cfg.parallel.pp_virtual_stages if SCHEDULES[cfg.parallel.pp_schedule][1] else 1


def _plain_step(c: _StepContext) -> dict[str, float]:
    """Micro-batches as trainer/train.py runs them; returns how to scale the first one's counts."""
    model, n, dp = c.pm.parts[0], len(c.batches), c.env.dims.dp
    for micro, (b, (noisy, t, noise)) in enumerate(zip(c.batches, c.noised)):
        c.pm.set_gradient_sync(micro, n, c.cfg.parallel.grad_sync)
        c.counter.phase = "forward" if micro == n - 1 else "forward_accum"
        with c.loss_ctx():
            with c.autocast:
                out = _CALL(model, b.tokens, b.position_ids, b.kv_lo, b.kv_hi, b.is_image, noisy, t)
                losses = transfusion_loss(out, b.text_targets, noise, c.cfg.diffusion.loss_weight, c.norm)
            c.counter.phase = "backward" if micro == n - 1 else "backward_accum"
            (losses.total * dp).backward()
        c.tracker.mark_accumulated_grads(c.pm.parts)
        del out, losses
    return {"accum": float(c.cfg.train.grad_accum - 1) if n > 1 else 0.0}


def _boundary_spec(model, cfg, dims, fake, batch, noised) -> list[tuple[tuple[int, ...], torch.dtype]]:  # noqa: ANN001
    """Shapes/dtypes of what one pipeline stage sends the next: (h, *U-Net skips padded to capacity)."""
    noisy, t, _ = noised
    bf16 = cfg.train.dtype == "bf16"
    sharded_bf16 = bf16 and dims.dp > 1
    with torch.no_grad(), (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
        h, skips = model.embed(to_fake(fake, batch.tokens), to_fake(fake, batch.is_image), to_fake(fake, noisy),
                               to_fake(fake, t))
    B, S, d = h.shape
    spec = [((B, S // dims.tp, d), torch.bfloat16 if sharded_bf16 else h.dtype)]
    cap = image_capacity(cfg)
    for s in skips:
        spec.append(((cap, *s.shape[1:]), torch.bfloat16 if sharded_bf16 else s.dtype))
    return spec


def _pipeline_step(c: _StepContext, boundary: list[tuple[tuple[int, ...], torch.dtype]]) -> None:
    """This rank's actions of the configured schedule, in order (see the module docstring)."""
    from torch.distributed.pipelining.schedules import _ComputationType as A

    pm, env, cfg, batches, noised, counter = c.pm, c.env, c.cfg, c.batches, c.noised, c.counter
    sched = pm.schedule
    stages = getattr(sched, "_stages", None) or [sched._stage]
    by_index = {s.stage_index: s for s in stages}
    pp_rank = env.mesh["pp"].get_local_rank()
    actions = _actions(sched, cfg, pp_rank, A)
    cache: dict[tuple[int, int], tuple] = {}
    nbytes = sum(torch.Size(s).numel() * torch.empty((), dtype=dt).element_size() for s, dt in boundary)

    def p2p(kind: str) -> None:
        rec = counter.comms.setdefault(("pp", kind), _comm_record(env))
        rec.bytes += nbytes
        rec.calls += 1

    for act in actions:
        stage = by_index[act.stage_index]
        mod, mb = stage.submod, act.microbatch_index
        kind = act.computation_type
        if kind == A.FORWARD:
            counter.phase = "forward"
            b, (noisy, t, noise) = batches[mb], noised[mb]
            kwargs = dict(position_ids=b.position_ids, kv_lo=b.kv_lo, kv_hi=b.kv_hi, is_image=b.is_image,
                          noisy_latents=noisy, timesteps=t, noise=noise)
            if stage.is_first:
                inputs = (b.tokens,)
            else:
                p2p("recv")
                inputs = tuple(torch.empty(s, dtype=dt).requires_grad_(True) for s, dt in boundary)
            with c.loss_ctx(), c.autocast:
                out = _CALL(mod, *inputs, **kwargs)
                if stage.is_last:
                    out = c.pipeline_loss(out, b.text_targets)
            if not stage.is_last:
                p2p("send")
            cache[(act.stage_index, mb)] = (out, inputs)
        elif kind in (A.FULL_BACKWARD, A.BACKWARD_INPUT):
            counter.phase = "backward"
            out, inputs = cache.pop((act.stage_index, mb))
            if isinstance(mod, FSDPModule):
                mod.set_is_last_backward(False)
                mod.set_reshard_after_backward(False)
                mod.set_requires_gradient_sync(False)
            with c.loss_ctx():
                if stage.is_last:
                    out.backward()
                else:
                    p2p("recv")
                    outs = [o for o in out if o.requires_grad]
                    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
            if not stage.is_first:
                p2p("send")
            c.tracker.mark_accumulated_grads([mod])
            del out, inputs
        elif kind == A.REDUCE_GRAD:
            counter.phase = "backward"
            stage.perform_reduce_grad(1)


def _actions(sched, cfg, pp_rank: int, A) -> list:  # noqa: ANN001
    """This rank's compute actions in execution order. Multi-stage schedules run their IR
    (`pipeline_order`); the single-stage ones run their own loops, reproduced here (in torch 2.14
    Schedule1F1B's IR is off by one micro-batch on the last stage, its loop is not)."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, _Action

    if isinstance(sched, PipelineScheduleMulti):
        order = [a for a in sched.pipeline_order[pp_rank] if a is not None]
        # The runtime adds each stage's REDUCE_GRAD after its last backward when the IR lacks it.
        for stage in {a.stage_index for a in order}:
            if not any(a.computation_type == A.REDUCE_GRAD and a.stage_index == stage for a in order):
                last = max(i for i, a in enumerate(order) if a.stage_index == stage
                           and a.computation_type in (A.FULL_BACKWARD, A.BACKWARD_INPUT, A.BACKWARD_WEIGHT))
                order.insert(last + 1, _Action(stage, A.REDUCE_GRAD, None))
        return order
    n, s = cfg.train.grad_accum, pp_rank
    F = [_Action(s, A.FORWARD, i) for i in range(n)]
    B = [_Action(s, A.FULL_BACKWARD, i) for i in range(n)]
    if cfg.parallel.pp_schedule == "gpipe":
        order = F + B
    else:  # 1F1B: warm-up forwards, then one backward + one forward, then the remaining backwards
        warm = min(n, cfg.parallel.pp - s)
        order, f, b = F[:warm], warm, 0
        while True:
            order.append(B[b])
            b += 1
            if f == n:
                break
            order.append(F[f])
            f += 1
        order += B[b:]
    return order + [_Action(s, A.REDUCE_GRAD, None)]


def _comm_record(env):  # noqa: ANN001, ANN202
    from .runtime import CommRecord

    ranks = dist.get_process_group_ranks(env.group("pp"))
    return CommRecord(group_size=len(ranks), intra_node=len({r // GPUS_PER_NODE for r in ranks}) == 1)
