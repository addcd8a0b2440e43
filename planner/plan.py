"""Scale rehearsal planner: one fake-mode training step of the real model at true shapes.

    python -m planner.plan --config configs/7b.yaml [overrides] --world-size 128 --gpu h100
    python -m planner.plan --config configs/7b.yaml --sweep --gpus 128 --gpu h100 [--json out.json]

For a config and layout, runs rank 0 (and one rank of every pipeline stage) through forward, loss,
backward, clipping and AdamW on fake tensors over a fake process group of the full world size
(planner/step.py), and reports per rank the peak memory and its split from torch's memory
tracker, the model FLOPs (span attention from the batch's spans), the bytes of every collective per
mesh dimension, and a roofline estimate of step time, tokens/s/GPU and MFU on a named GPU
(planner/hardware.py). Batches come from the synthetic source at the config's shapes
(data.source=synthetic, data.text_fraction=0.2: about as many image as text positions, the 1:1 mix
of the 7B recipe), so no shards are needed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from config import Config, ConfigError, load_config
from model.flops import step_model_flops
from trainer.data import build_loader

from .hardware import (
    COLLECTIVE_LATENCY_S, FRAGMENTATION, GPUS, OVERLAP_NOTE, RESERVED_BYTES, GPU, GiB, link_bw, step_time, usable_bytes,
)
from .runtime import ring_bytes
from .step import RankResult, run_rank

PLAN_DEFAULTS = ["data.source=synthetic", "data.text_fraction=0.2", "checkpoint.enabled=false", "logging.wandb=disabled"]


@dataclass
class LayoutReport:
    layout: dict
    ranks: list[dict] = field(default_factory=list)
    fits: bool = True
    reason: str = ""
    step_s: float = 0.0
    tokens_per_s_per_gpu: float = 0.0
    mfu: float = 0.0
    time_split: dict = field(default_factory=dict)
    model_flops_per_step: float = 0.0
    eval_s: float = 0.0  # one held-out evaluation (eval.every > 0): forward-only roofline, no communication
    eval_overhead: float = 0.0  # eval_s / (eval.every x step_s)
    error: str = ""


def layout_of(cfg: Config) -> dict:
    p, t = cfg.parallel, cfg.train
    return {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "pp": p.pp,
            "pp_schedule": p.pp_schedule if p.pp > 1 else "-", "ac": p.activation_checkpoint,
            "micro_batch": t.batch_size, "grad_accum": t.grad_accum,
            "grad_sync": p.grad_sync if p.pp == 1 and t.grad_accum > 1 else "-"}


def _measured_model_flops(r: RankResult) -> float:
    """Counted model FLOPs of the last micro-batch: matmuls/convs of forward and backward (recompute
    excluded) plus span-attention pairs. Equals model.flops.batch_flops when tp = pp = 1."""
    ph = r.counter.phases
    att = r.attention.flops({"forward": 1.0, "backward": 1.0, "recompute": 1.0})
    return ph["forward"].flops + ph["backward"].flops + att["model_fwd"] + att["model_bwd"]


def _rank_summary(r: RankResult, gpu: GPU) -> tuple[dict, float, float, dict[str, float]]:
    """Per-rank report; returns it with the rank's compute time, optimizer time and comm time per dim."""
    ph = r.counter.phases
    accum = r.micro_scale.get("accum", 0.0)
    weights = {"forward": 1.0, "backward": 1.0, "recompute": 1.0,
               "forward_accum": accum, "backward_accum": accum, "recompute_accum": accum}
    att = r.attention.flops(weights)
    fwd = ph["forward"].flops + accum * ph["forward_accum"].flops
    bwd = ph["backward"].flops + accum * ph["backward_accum"].flops
    recompute = ph["recompute"].flops + accum * ph["recompute_accum"].flops
    matmul_time = sum(w * ph[k].time_s for k, w in weights.items() if k in ph)
    att_time = (att["kernel_fwd"] + att["kernel_bwd"]) / gpu.bf16_flops
    compute = matmul_time + att_time
    optim = ph["clip"].time_s + ph["optimizer"].time_s
    comm: dict[str, float] = {}
    comm_bytes: dict[str, dict[str, int]] = {}
    clip_s = sum(ring_bytes(kind, rec.bytes, rec.group_size) / link_bw(gpu, rec.intra_node)
                 + rec.calls * COLLECTIVE_LATENCY_S[rec.intra_node]
                 for (dim, kind), rec in r.counter.comms_clip.items() if rec.group_size > 1)
    optim += clip_s
    for book, scale in ((r.counter.comms, 1.0), (r.counter.comms_accum, accum), (r.counter.comms_clip, 0.0)):
        for (dim, kind), rec in book.items():
            b = rec.bytes * scale
            comm_bytes.setdefault(dim, {}).setdefault(kind, 0)
            comm_bytes[dim][kind] += int(b if book is not r.counter.comms_clip else rec.bytes)
            latency = rec.calls * scale * COLLECTIVE_LATENCY_S[rec.intra_node] if rec.group_size > 1 else 0.0
            comm[dim] = comm.get(dim, 0.0) + ring_bytes(kind, b, rec.group_size) / link_bw(gpu, rec.intra_node) + latency
    clip_calls = r.counter.calls_by_phase.get("clip", 0)
    summary = {
        "rank": r.rank, "stages": r.stages,
        "peak_gib": round(r.peak_bytes / GiB, 2),
        "memory_gib": {k: round(v / GiB, 2) for k, v in r.peak_split.items()},
        "matmul_tflops": {"forward": round(fwd / 1e12, 2), "backward": round(bwd / 1e12, 2),
                          "recompute": round(recompute / 1e12, 2)},
        "attention_tflops": {k: round(v / 1e12, 2) for k, v in att.items()},
        "model_tflops_last_micro": round(_measured_model_flops(r) / 1e12, 3),
        # the step's forward (all micro-batches, no recompute): what a held-out evaluation step costs
        "forward_s": round(ph["forward"].time_s + accum * ph["forward_accum"].time_s + att["kernel_fwd"] / gpu.bf16_flops, 6),
        "analytic_tflops_last_micro": round(sum(r.analytic.values()) / 1e12, 3),
        "collective_gib": {d: {k: round(v / GiB, 3) for k, v in kinds.items()} for d, kinds in comm_bytes.items()},
        "clip_collectives": clip_calls, "clip_s": round(clip_s, 6),
        "fake_step_s": round(r.wall_s, 1),
    }
    return summary, compute, optim, comm


def _rank_worker(cfg: Config, rank: int, gpu: GPU) -> tuple[dict, float, float, dict[str, float], int, dict]:
    """One rank's fake step in its own process (a fake process group lives once per process)."""
    r = run_rank(cfg, rank, gpu)
    summary, compute, optim, comm = _rank_summary(r, gpu)
    return summary, compute, optim, comm, r.peak_bytes, r.peak_split


def plan_layout(cfg: Config, world_size: int, gpu: GPU, jobs: int = 1) -> LayoutReport:
    """Run the fake step for every pipeline stage of the layout in `cfg` and estimate its speed."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel = cfg.parallel.resolved(world_size)
    cfg.validate()
    p = cfg.parallel
    report = LayoutReport(layout_of(cfg))
    ranks = [s * p.tp for s in range(p.pp)]  # pp rank s, every other mesh coordinate 0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(ranks))), mp_context=ctx, max_tasks_per_child=1) as ex:
        results = list(ex.map(_rank_worker, [cfg] * len(ranks), ranks, [gpu] * len(ranks)))
    worst, worst_rank, worst_split = 0, 0, {}
    times = []
    for rank, (summary, compute, optim, comm, peak, split) in zip(ranks, results):
        report.ranks.append(summary)
        virtual = p.pp_virtual_stages if p.pp_schedule in ("interleaved_1f1b", "zero_bubble") else 1
        n_micro = cfg.train.grad_accum if p.pp > 1 else 1
        times.append(step_time(compute, optim, comm, p.pp, virtual, n_micro))
        if peak > worst:
            worst, worst_rank, worst_split = peak, rank, split
    st = max(times, key=lambda s: s.total_s)
    report.step_s = st.total_s
    report.time_split = {k: round(v, 4) for k, v in dataclasses.asdict(st).items()}
    loader = build_loader(cfg, 0, p.dp_replicate * p.dp_shard)
    per_micro = step_model_flops(cfg.model, [next(loader)])
    dp = p.dp_replicate * p.dp_shard
    report.model_flops_per_step = per_micro * cfg.train.grad_accum * dp
    tokens = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum * dp
    report.tokens_per_s_per_gpu = tokens / st.total_s / world_size
    report.mfu = report.model_flops_per_step / world_size / st.total_s / gpu.bf16_flops
    if cfg.eval.enabled:
        report.eval_s = eval_seconds(cfg, max(r["forward_s"] for r in report.ranks))
        report.eval_overhead = report.eval_s / (cfg.eval.every * st.total_s)
    limit = usable_bytes(gpu)
    if worst > limit:
        comp, size = max(worst_split.items(), key=lambda kv: kv[1])
        report.fits = False
        report.reason = (f"rank {worst_rank}: peak {worst / GiB:.1f} GiB > {limit / GiB:.1f} GiB usable of {gpu.name} "
                         f"({gpu.hbm_bytes / 1e9:.0f} GB - {RESERVED_BYTES / GiB:.0f} GiB reserved, "
                         f"/ {1 + FRAGMENTATION:.2f} fragmentation); largest part: {comp} {size / GiB:.1f} GiB")
    return report


def eval_seconds(cfg: Config, forward_s: float) -> float:
    """One held-out evaluation (trainer/evaluation.py): eval.rows dealt in steps of dp x grad_accum x
    batch_size rows, each a forward of the slowest rank (`forward_s`, the training step's forward),
    pipelined with the forward-only schedule's fill and drain."""
    p, t = cfg.parallel, cfg.train
    steps = math.ceil(cfg.eval.rows / (p.dp_replicate * p.dp_shard * t.grad_accum * t.batch_size))
    bubble = (t.grad_accum + p.pp - 1) / t.grad_accum if p.pp > 1 else 1.0
    return steps * forward_s * bubble


def sweep_layouts(cfg: Config, world: int, tps: list[int], pps: list[int], acs: list[str],
                  micro_batches: list[int], schedules: list[str]) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every candidate layout."""
    out = []
    for tp, pp, ac, mb in itertools.product(tps, pps, acs, micro_batches):
        scheds = schedules if pp > 1 else ["1f1b"]
        for sched in scheds:
            rest = world // (tp * pp) if world % (tp * pp) == 0 else 0
            dps = [(1, rest)]
            if tp == 1 and pp == 1 and rest > 8 and rest % 8 == 0:
                dps.append((rest // 8, 8))  # HSDP: shard inside a node, replicate across nodes
            for rep, shard in dps:
                ov = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp_replicate={rep}",
                      f"parallel.dp_shard={shard if rest else -1}", f"parallel.activation_checkpoint={ac}",
                      f"train.batch_size={mb}", f"parallel.pp_schedule={sched}"]
                if pp > 1 and cfg.train.grad_accum < pp:
                    ov.append(f"train.grad_accum={pp}")
                dp = f"dp{rep}x{shard}" if rest else "dp?"
                out.append((f"tp{tp} pp{pp}{'/' + sched if pp > 1 else ''} {dp} ac={ac} mb={mb}", ov))
    return out


def format_table(reports: list[LayoutReport]) -> str:
    head = f"{'layout':58} {'peak GiB':>9} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6}  note"
    lines = [head, "-" * len(head)]
    for r in reports:
        L = r.layout
        name = L.get("label") or (f"tp{L.get('tp')} pp{L.get('pp')} {L.get('pp_schedule')} dp{L.get('dp_replicate')}x"
                                  f"{L.get('dp_shard')} ac={L.get('ac')} mb={L.get('micro_batch')} ga={L.get('grad_accum')}")
        if r.error:
            lines.append(f"{name:58} {'-':>9} {'-':>8} {'-':>10} {'-':>6}  {r.error}")
            continue
        peak = max(x["peak_gib"] for x in r.ranks)
        note = "" if r.fits else "DOES NOT FIT: " + r.reason
        lines.append(f"{name:58} {peak:9.1f} {r.step_s:8.3f} {r.tokens_per_s_per_gpu:10.0f} {r.mfu:6.1%}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--world-size", "--gpus", dest="world", type=int, required=True)
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tp", default="1,2,4,8")
    ap.add_argument("--pp", default="1,2,4")
    ap.add_argument("--ac", default="none,full")
    ap.add_argument("--micro-batch", default=None, help="comma list (sweep); default: the config's")
    ap.add_argument("--schedules", default="1f1b,interleaved_1f1b")
    ap.add_argument("--json", default=None, help="write the reports here")
    ap.add_argument("--jobs", type=int, default=2, help="ranks planned in parallel processes")
    args = ap.parse_args(argv)
    gpu = GPUS[args.gpu]
    try:
        base = load_config(args.config, PLAN_DEFAULTS + args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.sweep:
        ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
        mbs = ints(args.micro_batch) if args.micro_batch else [base.train.batch_size]
        candidates = sweep_layouts(base, args.world, ints(args.tp), ints(args.pp), args.ac.split(","), mbs,
                                   args.schedules.split(","))
    else:
        candidates = [("", [])]
    reports = []
    for label, ov in candidates:
        try:
            cfg = load_config(args.config, PLAN_DEFAULTS + args.overrides + ov)
            rep = plan_layout(cfg, args.world, gpu, args.jobs)
        except ConfigError as e:
            rep = LayoutReport({"label": label}, error=f"config error: {e}")
            if not args.sweep:
                print(f"config error: {e}", file=sys.stderr)
                return 2
        reports.append(rep)
        if args.sweep:
            print(f"  planned {label or 'layout'}", file=sys.stderr, flush=True)
    ok = sorted([r for r in reports if not r.error and r.fits], key=lambda r: -r.tokens_per_s_per_gpu)
    rest = [r for r in reports if r.error or not r.fits]
    print(f"{gpu.name} x {args.world} ({gpu.source})")
    print(format_table(ok + rest))
    print(f"assumptions: {OVERLAP_NOTE}; fits = peak x {1 + FRAGMENTATION:.2f} + {RESERVED_BYTES / GiB:.0f} GiB "
          f"<= {gpu.hbm_bytes / 1e9:.0f} GB")
    if not args.sweep:
        r = reports[0]
        if r.eval_s:
            print(f"held-out evaluation (eval.every={base.eval.every}, eval.rows={base.eval.rows}): {r.eval_s:.2f} s "
                  f"each, {r.eval_overhead:.3%} of training time (forward-only roofline, communication not counted)")
        print(json.dumps(dataclasses.asdict(r), indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": dataclasses.asdict(gpu), "world_size": args.world, "assumptions": OVERLAP_NOTE,
                       "layouts": [dataclasses.asdict(r) for r in ok + rest]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
