"""What a result needs next to it to mean anything later: the device, the CPU, the versions and the
build, the exact code (git commit, "+dirty" when the tree has uncommitted changes) and the date."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _git(args, cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(where: Path = PACKAGE_DIR) -> str:
    """Short hash of the checkout that holds the fusedopt being run, "+dirty" when its tracked
    files differ from that commit; "unknown" for an installed copy outside any checkout. The
    package's own checkout, not the current directory's: that is the code that ran."""
    commit = _git(["rev-parse", "--short", "HEAD"], where)
    if not commit:
        return "unknown"
    changes = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return commit + ("+dirty" if changes else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def last_level_cache_bytes() -> Optional[int]:
    """Size of the largest CPU cache (Linux sysfs), or None. A working set smaller than this does
    not stream from memory, so a memory-bandwidth floor does not hold for it."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        best = size if best is None else max(best, size)
    return best


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): above the core count, other work
    competes for the CPU, and times (torch's threaded CPU paths most) stretch unevenly."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def capture(device: torch.device) -> dict:
    """The environment of a run on ``device``. Call it before timing: the commit is the code that runs."""
    import fusedopt

    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "load_average_1min": load_average(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "fusedopt": fusedopt.__version__,
        "build_info": fusedopt.build_info(),
        "commit": git_commit(),
        "threads": {"torch": torch.get_num_threads(), "fusedopt": fusedopt.get_num_threads()},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def headline(env: dict) -> str:
    """One line naming what the numbers below were measured on."""
    return (f"{env['device_name']} ({env['device']}, {env['usable_cores']} cores usable), torch {env['torch']}, "
            f"fusedopt {env['fusedopt']} at {env['commit']}, threads torch={env['threads']['torch']} "
            f"fusedopt={env['threads']['fusedopt']}, {env['date']}")


def busy_warning(env: dict) -> Optional[str]:
    """A line for the reader when the machine was busy as the run began, else None."""
    load = env.get("load_average_1min")
    if load is None or load <= env["usable_cores"]:
        return None
    return (f"busy machine: load average {load:.1f} on {env['usable_cores']} cores at the start; expect noisy rows "
            "(torch's threaded CPU paths can slow down by orders of magnitude when their threads wait for a core)")
