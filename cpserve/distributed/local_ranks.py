"""Ranks started on this host as fresh interpreters that import cpserve and nothing else.

multiprocessing's "spawn" re-imports the user's main module in every child, so a script
without an `if __name__ == "__main__":` guard runs again there and starts engines of its own
(the README's example died with a DistStoreError that way); "fork" is unsafe once CUDA or
threads are running. A rank here is `python -m cpserve.distributed.local_ranks SPEC`, where
SPEC is JSON of plain values (rank, store address, layout, launch, device, timeout, the worker
loop as "module:function"): no pickle, no user code re-run, the same with or without CUDA. A
rank exits when its driver dies, however it dies (`cpserve.child_process`: a lifeline pipe).

    driver (the user's process)                    rank r (a new interpreter)
    LocalRank(r, ...) --Popen(python -m ...)-->    main(): import the worker loop by name,
                                                   join the TCPStore, follow the plans
"""

from __future__ import annotations

import atexit
import importlib
import sys
import weakref
from collections.abc import Callable

from cpserve.child_process import ChildProcess, child_spec, watch_parent

_LIVE: weakref.WeakSet[LocalRank] = weakref.WeakSet()


class LocalRank(ChildProcess):
    """One rank's process, with the few `multiprocessing.Process` calls the pool uses."""

    def __init__(self, rank: int, store_addr: tuple[str, int], parallel: dict, launch: dict,
                 device: str, timeout_s: float, worker_loop: Callable) -> None:
        self.rank = rank
        target = f"{worker_loop.__module__}:{worker_loop.__qualname__}"
        if _resolve(target) is not worker_loop:
            raise ValueError(f"the worker loop {target} must be a module-level function")
        super().__init__(__name__, dict(rank=rank, store_addr=list(store_addr),
                                        parallel=parallel, launch=launch, device=device,
                                        timeout_s=timeout_s, worker_loop=target))
        _LIVE.add(self)


@atexit.register
def _kill_leftovers() -> None:
    """A driver that exits without shutting its pool down takes its ranks with it (as
    multiprocessing does with daemon children) instead of leaving them to time out."""
    for rank in list(_LIVE):
        rank.kill()


def _resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str]) -> None:
    from cpserve.distributed.worker_pool import run_spawned_rank

    spec = child_spec(argv)
    watch_parent(spec)
    run_spawned_rank(spec["rank"], tuple(spec["store_addr"]), spec["parallel"], spec["launch"],
                     spec["device"], spec["timeout_s"], _resolve(spec["worker_loop"]))


if __name__ == "__main__":
    main(sys.argv)
