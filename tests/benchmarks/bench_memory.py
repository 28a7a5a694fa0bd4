"""Benchmark: peak resident memory (and wall time) of ``tl-taskmap map``, measured in a subprocess.

The map runs as ``python -m tl_taskmap map --out TMP --force [extra args]`` (default configuration on
the embedded model unless you pass options). The child's peak RSS is the kernel's high-water mark
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``); a sampler also records RSS every ``--interval`` seconds
and the last progress line the map printed before each sample, so the peak can be tied to a stage.
Target (issue 13): peak RSS <= 2 GB for the default map.

    python tests/benchmarks/bench_memory.py                       # default map (minutes on a CPU)
    python tests/benchmarks/bench_memory.py -- --examples 8 --seeds 1 --task-names <a> <b>
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_map(extra: list[str], interval: float, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        cmd = [sys.executable, "-m", "tl_taskmap", "map", "--out", str(Path(tmp) / "report"), "--force", "--threads", str(threads), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        last_line = ["(start)"]
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            buf = ""
            while True:
                ch = proc.stdout.read(1)
                if not ch:
                    break
                if ch in "\r\n":
                    if buf.strip():
                        last_line[0] = buf.strip()[:120]
                        lines.append(buf)
                    buf = ""
                else:
                    buf += ch

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        samples: list[tuple[float, int, str]] = []
        while proc.poll() is None:
            samples.append((time.perf_counter() - start, rss_bytes(proc.pid), last_line[0]))
            time.sleep(interval)
        reader.join(timeout=5)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        return {"cmd": cmd, "rc": proc.returncode, "wall_s": wall, "peak_rss": peak, "samples": samples, "tail": lines[-15:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="RSS sampling interval (s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the map (1: steadier on a shared machine)")
    parser.add_argument("--target-gb", type=float, default=2.0)
    parser.add_argument("extra", nargs="*", help="options passed to `tl-taskmap map` (after --)")
    args = parser.parse_args()
    result = run_map(args.extra, args.interval, args.threads)
    print("command:", " ".join(result["cmd"]))
    if result["rc"] != 0:
        print("\n".join(result["tail"]))
        raise SystemExit(f"map failed with exit code {result['rc']}")
    gb = result["peak_rss"] / 1e9
    print(f"wall time: {result['wall_s']:.0f} s   peak RSS: {gb:.2f} GB (target <= {args.target_gb:.1f} GB: {'met' if gb <= args.target_gb else 'NOT met'})")
    # Highest sampled RSS per stage line, in order of first appearance.
    per_stage: dict[str, int] = {}
    for _, rss, line in result["samples"]:
        per_stage[line] = max(per_stage.get(line, 0), rss)
    print("largest sampled RSS by the progress line printed before it:")
    for line, rss in sorted(per_stage.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {rss / 1e9:5.2f} GB  {line}")


if __name__ == "__main__":
    main()
