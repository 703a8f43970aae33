"""The machine a benchmark ran on, and the matrix-multiply throughput it reaches: the roofline that a
training step's throughput is quoted against."""

from __future__ import annotations

import logging
import os
import platform
import time

import torch

log = logging.getLogger(__name__)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device``: CUDA runs asynchronously, so a clock read without it
    times the launches, not the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 1024,
                  seconds: float = 2.0) -> float:
    """GFLOP/s of ``size x size`` matrix products on ``device``: what a dense training step can at best
    reach, so that a measured step can be quoted as a fraction of it.

    A few products warm up (thread pools, cuBLAS handles, clocks); then rounds of products, each twice
    as many as the last until one round takes a tenth of ``seconds``, run for about ``seconds``. One
    product is ``2 n^3`` flops (a multiply and an add per multiply-accumulate).
    """
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty(size, size, dtype=dtype, device=device)

    def products(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            torch.mm(a, b, out=out)
        synchronize(device)
        return time.perf_counter() - start

    products(3)
    done, elapsed, n = 0, 0.0, 1
    while elapsed < seconds:
        took = products(n)
        done, elapsed = done + n, elapsed + took
        if took < seconds / 10:
            n *= 2
    gflops = 2 * size**3 * done / elapsed / 1e9
    log.info("%d products of %d x %d %s matrices on %s in %.2f s: %.1f GFLOP/s", done, size, size, dtype, device,
             elapsed, gflops)
    return gflops


def cpu_model() -> str:
    """The CPU's name from ``/proc/cpuinfo`` (Linux), else what :func:`platform.processor` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def describe(device: str) -> dict:
    """What a benchmark's numbers depend on besides the code: the device, the threads torch uses and the
    CPUs this process may run on, the CPU and GPU models, the torch version, and the load average of the
    last minute: other processes on the CPUs slow torch's threads down (on a busy core, each parallel
    region waits for its turn), by far more than their share of the CPU."""
    dev = torch.device(device)
    return {"device": device, "threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)),
            "cpu_model": cpu_model(), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__, "load_average": os.getloadavg()[0]}
