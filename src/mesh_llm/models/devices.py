"""What accelerators and backends this machine really has, probed by running them."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DeviceReport:
    device: str  # torch device string
    name: str  # product name or CPU model
    memory_gib: float  # total memory of the device (system RAM for the CPU)
    nf4_works: bool  # a bitsandbytes NF4 Linear4bit ran and matched float32 on this device
    nf4_note: str  # why not, when it did not
    bf16_supported: bool  # whether bfloat16 tensors work here


@contextlib.contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    """Hide bitsandbytes' notes about optional kernels: the probe's own result says whether NF4 works."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def probe_nf4(device: str) -> tuple[bool, str]:
    """Quantise a small linear layer to NF4 on device, run it, and compare with float32."""
    with _quiet_bitsandbytes():
        return _run_nf4(device)


def _run_nf4(device: str) -> tuple[bool, str]:
    try:
        import bitsandbytes as bnb
        import torch

        torch.manual_seed(0)
        dense = torch.nn.Linear(64, 64, bias=False)
        quant = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        quant.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        quant = quant.to(device)
        x = torch.randn(4, 64)
        with torch.no_grad():
            got = quant(x.to(device)).float().cpu()
            want = dense(x)
        err = float((got - want).abs().max() / want.abs().max())
        return (err < 0.2, "" if err < 0.2 else f"NF4 output off by {err:.2f}")
    except Exception as exc:  # any failure here means "does not work on this device"
        return False, f"{type(exc).__name__}: {exc}"[:200]


def probe_devices() -> list[DeviceReport]:
    """One report per CUDA device, then the CPU."""
    import torch

    reports = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            works, note = probe_nf4(f"cuda:{index}")
            reports.append(DeviceReport(device=f"cuda:{index}", name=props.name, memory_gib=props.total_memory / 2**30,
                                        nf4_works=works, nf4_note=note,
                                        bf16_supported=torch.cuda.is_bf16_supported()))
    works, note = probe_nf4("cpu")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    reports.append(DeviceReport(device="cpu", name=_cpu_name(), memory_gib=memory, nf4_works=works,
                                nf4_note=note, bf16_supported=True))
    return reports


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"
