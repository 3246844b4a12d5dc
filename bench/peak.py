"""Run ``-m MODULE ARGS...`` or ``-c CODE ARGS...`` as ``python3`` would, and at exit write this
process's own peak resident set size (``VmHWM`` of /proc/self/status, in KiB) to the file named by
the environment variable ``REPORTGEN_BENCH_PEAK``.

``os.wait4``'s ``ru_maxrss`` of a child counts the memory of the process that forked it (the
child's high-water mark before ``exec`` is its parent's resident size), so a benchmark that holds
torch would see every child start at its own size; ``VmHWM`` after ``exec`` is the child's alone.
"""

import atexit
import os
import re
import runpy
import sys


def _record() -> None:
    with open("/proc/self/status", encoding="ascii") as status:
        peak = re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE)
    with open(os.environ["REPORTGEN_BENCH_PEAK"], "w", encoding="ascii") as out:
        out.write(peak.group(1) if peak else "")


def main() -> None:
    atexit.register(_record)
    flag, target, *rest = sys.argv[1:]
    if flag == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif flag == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"peak.py: expected -m MODULE or -c CODE, got {flag}")


if __name__ == "__main__":
    main()
