"""A child for tests of `cpserve.child_process`: starts `depth` more generations of itself,
prints its pid, then waits to be killed or orphaned (its lifeline)."""

from __future__ import annotations

import sys
import time

from cpserve.child_process import ChildProcess, child_spec, watch_parent

if __name__ == "__main__":
    spec = child_spec(sys.argv)
    watch_parent(spec)
    children = []
    if spec["depth"] > 0:
        children.append(ChildProcess(__spec__.name, {"depth": spec["depth"] - 1}))
    print(f"pid {spec['depth']} {__import__('os').getpid()}", flush=True)
    time.sleep(120)
