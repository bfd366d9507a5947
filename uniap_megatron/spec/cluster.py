"""The machines: GPU figures, node shape and network, plus the calibrated efficiencies."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from uniap_megatron.errors import InputError, require_positive_int

GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Per-GPU figures are dense peaks; bandwidths are one way, per GPU, in GB/s (1e9 B/s)."""

    name: str = "custom"
    gpu: str
    num_nodes: int = 1
    gpus_per_node: int = 8
    peak_tflops_bf16: float
    peak_tflops_fp8: float | None = None
    memory_gib: float
    """Device memory as the driver reports it (e.g. 79.6 GiB on an 80 GB H100)."""
    memory_reserve_gib: float = 5.0
    """Held back for the CUDA context, NCCL buffers, workspaces and allocator fragmentation."""
    hbm_bandwidth_gbps: float
    intra_node_bandwidth_gbps: float
    intra_node_latency_us: float = 5.0
    inter_node_bandwidth_gbps: float
    inter_node_latency_us: float = 10.0
    # Calibrated constants (benchmarks/fidelity.py fits them against published measurements).
    gemm_efficiency: float = 0.6
    """Fraction of peak FLOP/s that matrix multiplications achieve in a training step."""
    comm_efficiency: float = 0.8
    """Fraction of the link bandwidth that NCCL collectives achieve."""
    step_overhead_s: float = 0.0
    """Fixed time per iteration: data loading, scheduler, logging, launch gaps."""
    cuda_device_max_connections_needed: bool = True
    """Pre-Blackwell GPUs need CUDA_DEVICE_MAX_CONNECTIONS=1 for TP/CP overlap ordering."""

    def __post_init__(self) -> None:
        for field in ("num_nodes", "gpus_per_node"):
            require_positive_int(f"cluster.{field}", getattr(self, field))
        for field in (
            "peak_tflops_bf16",
            "memory_gib",
            "hbm_bandwidth_gbps",
            "intra_node_bandwidth_gbps",
            "inter_node_bandwidth_gbps",
        ):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise InputError(f"cluster.{field} ({value!r}) must be a positive number.")
        for field in ("gemm_efficiency", "comm_efficiency"):
            value = getattr(self, field)
            if not 0 < value <= 1:
                raise InputError(f"cluster.{field} ({value!r}) must lie in (0, 1].")
        if not 0 <= self.memory_reserve_gib < self.memory_gib:
            raise InputError(
                f"cluster.memory_reserve_gib ({self.memory_reserve_gib}) must be at least 0 and "
                f"below cluster.memory_gib ({self.memory_gib})."
            )
        if self.step_overhead_s < 0:
            raise InputError(f"cluster.step_overhead_s ({self.step_overhead_s}) must be >= 0.")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def usable_memory_bytes(self) -> float:
        return (self.memory_gib - self.memory_reserve_gib) * GIB

    def peak_flops(self, precision: str) -> float:
        """Peak FLOP/s of the GEMMs at ``precision`` (bf16 and fp16 share one peak; fp8)."""
        if precision == "fp8":
            if self.peak_tflops_fp8 is None:
                raise InputError(
                    f"train.precision (fp8) needs cluster.peak_tflops_fp8, which {self.gpu} "
                    "does not define; set it or train in bf16."
                )
            return self.peak_tflops_fp8 * 1e12
        return self.peak_tflops_bf16 * 1e12

    def replace(self, **changes) -> ClusterSpec:
        return dataclasses.replace(self, **changes)
