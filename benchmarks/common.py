"""Shared pieces of the benchmarks: the machine, timing by medians, markdown tables, the matmul peak."""

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads),"
            f" Python {platform.python_version()}")


def header(title: str) -> str:
    return f"### {title}\n\nMachine: {machine()}\nCommand: `python {' '.join(sys.argv)}`\n"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(headers: list[str], rows: list[list]) -> str:
    align = "|" + "|".join(" ---: " if i else " --- " for i in range(len(headers))) + "|"
    lines = ["| " + " | ".join(headers) + " |", align]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Sustained float32 matrix-multiply throughput: the ceiling for everything else here."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: a @ b, repeats, warmup=3)
    return 2 * size**3 / seconds / 1e9


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def run_isolated(script: str, memory: bool = False, **kwargs) -> dict:
    """Run one measurement in a fresh process (so that memory peaks do not leak between rows); returns its JSON.

    With `memory`, a fixed mmap threshold makes glibc return every large free to the system at once, so resident
    memory follows the live tensors (by default the threshold grows after frees and memory stays cached in the heap);
    it also slows allocation, so times are measured in another process without it."""
    import json
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if memory else None
    result = subprocess.run([sys.executable, script, "--child", json.dumps(kwargs)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{script} {kwargs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_and_peak(step: Callable[[], object], repeats: int) -> dict:
    """In the measuring process: one warm-up step (allocations, optimizer state), then the median time of `repeats`
    steps and the peak resident memory during them above the resident memory before them."""
    step()
    before = rss_mb("VmRSS")
    reset_peak_rss()
    seconds = median_seconds(step, repeats, warmup=0)
    return {"seconds": seconds, "peak_mb": rss_mb() - before}


def measure_isolated(script: str, repeats: int, **kwargs) -> dict:
    """Time over `repeats` steps in one fresh process, peak memory of one step in another (see `run_isolated`)."""
    seconds = run_isolated(script, repeats=repeats, **kwargs)["seconds"]
    return {"seconds": seconds, "peak_mb": run_isolated(script, memory=True, repeats=1, **kwargs)["peak_mb"]}


def answer_child(child: str | None, measure: Callable[..., dict]) -> bool:
    """The measuring side of `run_isolated`: with --child, print measure(**arguments) as JSON and return True."""
    if child is None:
        return False
    import json

    print(json.dumps(measure(**json.loads(child))))
    return True
