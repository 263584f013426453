"""How busy the machine was while a load test ran: the parties of the test (this process, its
Locust runs and the server) share the CPUs with whatever else runs, and a throughput measured
beside other work is lower (a saturation run measured 1.15x the in-process handler on an idle
machine and 0.63x beside other load). The report states the load and warns when it was not idle."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

__all__ = ["MachineLoad", "IDLE_LOAD", "IDLE_OTHERS_CORES", "load_lines"]

#: above either, the report warns that the machine was not idle
IDLE_LOAD = 0.5  # 1-minute load average before the run
IDLE_OTHERS_CORES = 0.2  # cores used on average by processes outside the test


def _machine_busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_seconds() -> float:
    """CPU seconds of this process and every child it has waited for (the Locust runs)."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class MachineLoad:
    """Start before the test; ``finish(server_seconds)`` with the server's CPU seconds over the run."""

    def __init__(self, clock: Callable[[], float] = None):
        import time

        self._clock = clock or time.monotonic
        self.load_before = os.getloadavg()
        self._t0, self._busy0, self._own0 = self._clock(), _machine_busy_seconds(), _own_seconds()

    def finish(self, server_seconds: float) -> Dict[str, float]:
        wall = max(self._clock() - self._t0, 1e-9)
        busy = _machine_busy_seconds() - self._busy0
        ours = _own_seconds() - self._own0 + server_seconds
        return {
            "load_1min_before": round(self.load_before[0], 2),
            "machine_busy_cores": round(busy / wall, 2),
            "test_cores": round(ours / wall, 2),
            "others_cores": round(max(0.0, busy - ours) / wall, 2),
            "cpus": os.cpu_count(),
        }


def load_lines(machine: Optional[Dict[str, float]]) -> List[str]:
    """The report's lines about the machine's load, with a warning when it was not idle."""
    if not machine:
        return []
    lines = [
        f"- machine load: 1-minute load average {machine['load_1min_before']:.2f} before the run; during it "
        f"{machine['machine_busy_cores']:.2f} of {machine['cpus']} cores busy on average, "
        f"{machine['test_cores']:.2f} of them the test's own (Locust, the server, this process) and "
        f"{machine['others_cores']:.2f} other processes'"
    ]
    if machine["load_1min_before"] > IDLE_LOAD or machine["others_cores"] > IDLE_OTHERS_CORES:
        lines.append(
            "- **warning: the machine was not idle.** Other work shared the CPUs, so the throughputs and "
            "latencies here are worse than the same run on an idle machine; rerun with nothing else running "
            "before comparing them with other reports."
        )
    return lines
