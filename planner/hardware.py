"""The planner's time and memory model on a named GPU (planner/plan.py, planner/step.py).

The GPU datasheet entries live with the trainer, which reads their peak for its MFU
(trainer/hardware.py); here are the planner's own assumptions: node size, allocator headroom,
collective latency and which phases overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.hardware import GPU, GPUS, gpu_for_device_name

__all__ = [
    "GPU", "GPUS", "gpu_for_device_name", "GiB", "GPUS_PER_NODE", "FRAGMENTATION", "RESERVED_BYTES",
    "COLLECTIVE_LATENCY_S", "OVERLAP_NOTE", "usable_bytes", "link_bw", "StepTime", "step_time",
]

GiB = 1 << 30

GPUS_PER_NODE = 8  # the datasheets' reference node (DGX): NVLink inside it, one NIC per GPU across
# A layout fits when peak * (1 + FRAGMENTATION) + RESERVED <= HBM capacity: the caching allocator's
# fragmentation (10%), plus the CUDA context, NCCL communicator buffers and cuBLAS workspaces (3 GiB).
FRAGMENTATION = 0.10
RESERVED_BYTES = 3 * GiB

# Fixed cost of one collective call (launch + synchronisation + ring latency), an assumption in the
# range NCCL shows for small messages: it is what one-collective-per-parameter code pays.
COLLECTIVE_LATENCY_S = {True: 10e-6, False: 30e-6}  # intra-node, inter-node

OVERLAP_NOTE = (
    "roofline: each op takes max(FLOPs / peak bf16, bytes / HBM bandwidth); collectives: ring bytes / link "
    "bandwidth (NVLink inside a node of 8, the NIC across nodes) + 10 us (intra) / 30 us (inter) per call; "
    "FSDP all-gather/reduce-scatter and HSDP all-reduce overlap with compute (only the excess is exposed); "
    "tensor-parallel collectives and pipeline send/recv are on the critical path (added); "
    "pipeline bubble (pp-1)/(v*m) of the forward+backward time; optimizer step and grad clipping not overlapped"
)


def usable_bytes(gpu: GPU) -> float:
    """What the planner's peak (tensors only) may reach on `gpu`."""
    return (gpu.hbm_bytes - RESERVED_BYTES) / (1 + FRAGMENTATION)


def link_bw(gpu: GPU, intra_node: bool) -> float:
    return gpu.nvlink_bw if intra_node else gpu.internode_bw


@dataclass
class StepTime:
    compute_s: float  # forward + backward (incl. recompute) roofline time of the whole step
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float  # FSDP/HSDP collective time (overlappable)
    bubble_s: float
    optimizer_s: float
    total_s: float


def step_time(
    compute_s: float, optimizer_s: float, comm_s_by_dim: dict[str, float], pp: int, virtual: int, n_micro: int,
) -> StepTime:
    """Combine per-phase times with the overlap assumptions in OVERLAP_NOTE."""
    tp = comm_s_by_dim.get("tp", 0.0)
    pp_comm = comm_s_by_dim.get("pp", 0.0)
    dp = sum(v for k, v in comm_s_by_dim.items() if k not in ("tp", "pp"))
    critical = compute_s + tp + pp_comm
    bubble = critical * (pp - 1) / (virtual * n_micro) if pp > 1 else 0.0
    exposed_dp = max(0.0, dp - critical)
    total = critical + bubble + exposed_dp + optimizer_s
    return StepTime(compute_s, tp, pp_comm, dp, bubble, optimizer_s, total)
