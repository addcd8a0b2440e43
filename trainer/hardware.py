"""GPU datasheet numbers: the trainer's MFU reads the dense bf16 peak, the planner (planner/hardware.py)
its time and memory model.

Vendor datasheet values, dense (without 2:4 sparsity). Link bandwidths are per GPU and per
direction, which is what a ring collective is limited by: NVLink inside a node, one NIC per GPU
across nodes (the vendor's reference node, DGX).
"""

from __future__ import annotations

from dataclasses import dataclass


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


def gpu_for_device_name(name: str) -> GPU | None:
    """The table entry for a CUDA device name (torch.cuda.get_device_name()), or None if unknown."""
    name = name.upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return GPUS[key.lower()]
    return None
