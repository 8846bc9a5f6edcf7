"""Memory and CPU of this benchmark's process tree (the Python driver, the Spark JVM, the Python workers).

Shared by the benchmarks. PSS (proportional set size) splits pages shared between processes, e.g.
forked Python workers, instead of counting them once per process as RSS does; both are read from
``/proc/<pid>/smaps_rollup``.
"""

from __future__ import annotations

import os
import threading
import time

ROLES = ("jvm", "python_driver", "python_workers")


def _process_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, command name, CPU seconds incl. reaped children) of every process."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = sum(int(x) for x in fields[11:15]) / ticks  # utime, stime, cutime, cstime
        table[int(entry)] = (int(fields[1]), name, cpu)
    return table


def _tree(table: dict[int, tuple[int, str, float]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _rss_pss_bytes(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def tree_cpu_seconds() -> float:
    table = _process_table()
    return sum(table[p][2] for p in _tree(table, os.getpid()))


class MemoryPoller:
    """Polls this process tree's memory every ``interval`` seconds while in the ``with`` block.

    After it: ``before`` / ``before_rss`` (PSS by role and total RSS at the start), ``peak`` (the peak of
    each PSS figure on its own: ``total``, ``jvm``, ``python_driver``, ``python_worker_max``,
    ``python_workers_total``), ``peak_rss`` (total RSS), ``at_peak`` (PSS by role at the moment of the
    total PSS peak) and ``cpu_seconds`` of the tree over the block.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = dict.fromkeys(("total", "jvm", "python_driver", "python_worker_max", "python_workers_total"), 0)
        self.peak_rss = 0
        self.at_peak: dict[str, int] = dict.fromkeys(ROLES, 0)
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[dict[str, int], int]:
        """One reading: PSS by role (plus ``total`` and ``python_worker_max``) and total RSS; peaks updated."""
        table = _process_table()
        root = os.getpid()
        tree = _tree(table, root)
        memory = {p: _rss_pss_bytes(p) for p in tree}
        pss = {p: m[1] for p, m in memory.items()}
        workers = [pss[p] for p in tree if p != root and table[p][1].startswith("python")]
        now = {"total": sum(pss.values()), "jvm": sum(pss[p] for p in tree if table[p][1] == "java"),
               "python_driver": pss[root], "python_worker_max": max(workers, default=0),
               "python_workers_total": sum(workers)}
        if now["total"] > self.peak["total"]:
            self.at_peak = {"jvm": now["jvm"], "python_driver": now["python_driver"],
                            "python_workers": now["python_workers_total"]}
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        rss = sum(m[0] for m in memory.values())
        self.peak_rss = max(self.peak_rss, rss)
        return now, rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> MemoryPoller:
        self._cpu_start = tree_cpu_seconds()
        self.before, self.before_rss = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_seconds = tree_cpu_seconds() - self._cpu_start

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {f"peak_pss_{k}_mb": round(v / 2**20) for k, v in self.peak.items()}
        out["cpu_seconds"] = round(self.cpu_seconds, 1)
        return out
