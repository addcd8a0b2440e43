"""GPU specs and the roofline step-time model of the planner (planner/plan.py); the trainer reads the peak for its MFU.

Numbers are vendor datasheet values (dense, i.e. without 2:4 sparsity). Link bandwidths are per GPU
and per direction, which is what a ring collective is limited by.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # peak dense bf16 tensor-core FLOP/s
    hbm_bytes: float  # memory capacity
    hbm_bw: float  # bytes/s
    nvlink_bw: float  # intra-node bytes/s per GPU per direction
    internode_bw: float  # inter-node bytes/s per GPU per direction (one NIC per GPU)
    source: str


GPUS: dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS bf16 dense (1979 with sparsity), 80 GB
    # HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional; DGX H100 datasheet: 8x ConnectX-7 400 Gb/s.
    "h100": GPU("H100 SXM 80GB", 989e12, 80e9, 3.35e12, 450e9, 50e9,
                "NVIDIA H100 datasheet (SXM5); DGX H100 datasheet (ConnectX-7 NDR 400 Gb/s per GPU)"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOPS bf16 dense, 141 GB HBM3e at 4.8 TB/s,
    # NVLink 900 GB/s; DGX H200: 8x ConnectX-7 400 Gb/s.
    "h200": GPU("H200 SXM 141GB", 989e12, 141e9, 4.8e12, 450e9, 50e9,
                "NVIDIA H200 datasheet (SXM); DGX H200 datasheet (ConnectX-7 NDR 400 Gb/s per GPU)"),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): 312 TFLOPS bf16 dense, 80 GB HBM2e at
    # 2,039 GB/s, NVLink 600 GB/s bidirectional; DGX A100 datasheet: 8x ConnectX-6 HDR 200 Gb/s.
    "a100": GPU("A100 SXM 80GB", 312e12, 80e9, 2.039e12, 300e9, 25e9,
                "NVIDIA A100 datasheet (SXM 80GB); DGX A100 datasheet (ConnectX-6 HDR 200 Gb/s per GPU)"),
}

GPUS_PER_NODE = 8
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


def gpu_for_device_name(name: str) -> GPU | None:
    """The table entry for a CUDA device name (torch.cuda.get_device_name()), or None if unknown."""
    name = name.upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return GPUS[key.lower()]
    return None


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
