"""The ranks of one parallel layout, started once, and the driver's channel to them.

    driver (rank 0)                            worker (rank r > 0)
    ---------------                            -------------------
    pool.run(StepPlan(load=config))   ─gloo─>  worker_loop(groups, device): builds a runner
    pool.run(plan, local_work)                 runs each plan   <─ NCCL/gloo collectives ─>
    pool.shutdown()                            exit

The pool knows nothing of models: what a worker does with plans is `worker_loop`, given by
the engine (`cpserve.engine.worker.serve_plans`). This module is transport and launch only.

Three ways to start the ranks:

- one node (the default): the driver starts the other ranks itself, as new interpreters
  (`local_ranks`: a user's script needs no main guard);
- several nodes, as vLLM does it (`--nnodes N --node-rank R --master-addr A --master-port P`):
  node 0 runs the driver, its own share of ranks and the rendezvous store on A:P; every other
  node runs `run_node_ranks` (`cpserve serve --headless`), which starts that node's ranks and
  returns when they exit, which they do when the driver shuts down or stops answering;

      node 0: rank 0 (driver) + ranks 1..k-1      node 1: ranks k..2k-1     ...
              store on A:P  <───────── every rank connects, waits for all ─────────>

- torchrun: every rank is started by torchrun, rank 0 becomes the driver and the others serve
  plans inside `WorkerPool(...)` and exit when the driver shuts down.

A pool outlives engines: an engine with another config of the same layout (tp, pcp, dcp)
loads its model into the running ranks.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.distributed as dist

from cpserve.config import ConfigError, LaunchConfig, ParallelConfig
from cpserve.distributed.groups import ParallelGroups, build_groups, single_process_groups
from cpserve.distributed.local_ranks import LocalRank
from cpserve.distributed.plan import StepPlan, broadcast_plan

# What a non-driver rank runs until shutdown: follows the driver's plans.
WorkerLoop = Callable[[ParallelGroups, torch.device], None]

# A rank that does not answer a collective for this long is taken for dead. Steps are kept
# short by max_num_batched_tokens; an idle driver sends keep-alive plans well within it.
DEFAULT_TIMEOUT_S = 25.0


# Nodes are started by hand or by a scheduler, seconds or minutes apart: how long the ranks
# wait for each other at start-up, before the (shorter) collective timeout applies.
JOIN_TIMEOUT_S = 600.0
# Starting a rank's interpreter (torch, the model code) takes seconds on a loaded host: on one
# node the rendezvous waits at least this long, whatever the collectives' timeout.
RENDEZVOUS_TIMEOUT_S = 60.0
_STARTED_KEY = "cpserve/started/"


def _rendezvous_timeout(timeout_s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(timeout_s, RENDEZVOUS_TIMEOUT_S))


def default_timeout_s() -> float:
    return float(os.environ.get("CPSERVE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


class WorkerDiedError(RuntimeError):
    """A rank stopped: it exited, crashed, or stopped answering collectives."""


def rank_device(device: str, local_rank: int) -> torch.device:
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _init_distributed(parallel: ParallelConfig, rank: int, rendezvous: dict,
                      device: torch.device, timeout_s: float) -> ParallelGroups:
    """`rendezvous`: {"store": a TCPStore} or {"init_method": "env://"} (torchrun)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    world = parallel.world_size
    if device.type == "cuda":
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout,
                                device_id=device, **rendezvous)
        cpu_group = dist.new_group(list(range(world)), backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout,
                                **rendezvous)
        cpu_group = dist.group.WORLD
    return build_groups(parallel, rank, cpu_group)


def _share_cpu_threads(device: str, world: int) -> None:
    """Ranks on one CPU host split its cores: idle intra-op threads of one rank would
    otherwise spin on cores the other ranks need."""
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def gather_to_driver(values: torch.Tensor, groups: ParallelGroups) -> list[torch.Tensor] | None:
    """Gather a 1-D int64 tensor of any length from every rank; the list on rank 0."""
    size = torch.tensor([values.numel()])
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(groups.world_size)]
    dist.all_gather(sizes, size, group=groups.cpu_group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), -1, dtype=torch.long)
    padded[: values.numel()] = values.cpu()
    parts = [torch.empty_like(padded) for _ in range(groups.world_size)]
    dist.all_gather(parts, padded, group=groups.cpu_group)
    if not groups.is_driver:
        return None
    return [p[: int(s.item())] for p, s in zip(parts, sizes)]


def _closed_key(rank: int) -> str:
    return f"cpserve/closed/{rank}"


def _connect_to_node_0(store_addr: tuple[str, int], timeout_s: float) -> dist.TCPStore:
    """The rendezvous store on node 0, which may start after this node. Until its port
    accepts connections, plain socket probes (quiet, and a signal is handled between two)
    rather than torch's client, which would block and log a stack trace per attempt."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        try:
            with socket.create_connection(store_addr, timeout=2):
                break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node 0's rendezvous store at {store_addr[0]}:"
                                   f"{store_addr[1]} did not answer within "
                                   f"{JOIN_TIMEOUT_S:.0f} s (--master-addr, --master-port): "
                                   f"{exc}") from None
            time.sleep(0.5)
    return dist.TCPStore(*store_addr, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def _wait_for_all_ranks(store: dist.TCPStore, world: int, rank: int) -> None:
    """Start-up barrier of a multi-node launch, with the long join timeout: the process group
    is created only once every rank has reached the store."""
    store.add("cpserve/joined", 1)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    announced = False
    while (joined := store.add("cpserve/joined", 0)) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {joined} of {world} ranks joined within "
                               f"{JOIN_TIMEOUT_S:.0f} s; start every node with the same "
                               "--nnodes, --master-addr and --master-port")
        if rank == 0 and not announced:
            print(f"cpserve: waiting for the other nodes' ranks ({joined} of {world} joined)",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(0.1)


def _serve_as_worker(rank: int, store_addr: tuple[str, int], parallel: ParallelConfig,
                     launch: LaunchConfig, device: str, timeout_s: float,
                     worker_loop: WorkerLoop) -> None:
    """Join the ranks as `rank` and follow the driver's plans until it shuts down."""
    local_ranks = launch.local_ranks(parallel.world_size)
    _share_cpu_threads(device, len(local_ranks))
    local_device = rank_device(device, rank - local_ranks.start)
    if launch.nnodes > 1:
        store = _connect_to_node_0(store_addr, timeout_s)
        _wait_for_all_ranks(store, parallel.world_size, rank)
    else:
        store = dist.TCPStore(*store_addr, is_master=False,
                              timeout=_rendezvous_timeout(timeout_s))
        store.set(f"{_STARTED_KEY}{rank}", "1")  # see WorkerPool._wait_for_ranks_to_start
    groups = _init_distributed(parallel, rank, {"store": store}, local_device, timeout_s)
    worker_loop(groups, local_device)
    dist.destroy_process_group()
    try:
        store.set(_closed_key(rank), "1")  # the driver of a multi-node pool waits for this
    except Exception:  # the driver is gone already: nobody is waiting
        pass


def run_spawned_rank(rank: int, store_addr: tuple[str, int], parallel: dict, launch: dict,
                     device: str, timeout_s: float, worker_loop: WorkerLoop) -> None:
    """Entry point of a locally started rank (see `local_ranks`: plain values only)."""
    try:
        _serve_as_worker(rank, store_addr, ParallelConfig(**parallel), LaunchConfig(**launch),
                         device, timeout_s, worker_loop)
    except Exception as exc:  # the driver reports this rank by its exit code
        print(f"cpserve rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)


def _spawn_ranks(ranks: range, store_addr: tuple[str, int], parallel: ParallelConfig,
                 launch: LaunchConfig, device: str, timeout_s: float,
                 worker_loop: WorkerLoop) -> list[LocalRank]:
    return [LocalRank(rank, store_addr, asdict(parallel), asdict(launch), device, timeout_s,
                      worker_loop) for rank in ranks]


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_node_ranks(parallel: ParallelConfig, launch: LaunchConfig, device: str,
                   worker_loop: WorkerLoop, timeout_s: float | None = None) -> int:
    """A node other than node 0 of a multi-node launch (`--headless`): run its ranks, this
    process being the first of them, until the driver shuts down. Returns the exit code:
    0 after a shutdown by the driver, 1 if a rank failed or the driver stopped answering."""
    timeout_s = timeout_s if timeout_s is not None else default_timeout_s()
    ranks = launch.local_ranks(parallel.world_size)
    store_addr = (launch.master_addr, launch.master_port)
    # SIGTERM (a scheduler stopping the node) becomes SystemExit, so the spawned ranks are
    # stopped with this one instead of left running. Python runs the handler between two
    # collectives, which the driver's keep-alive plans make seconds apart.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    processes = _spawn_ranks(ranks[1:], store_addr, parallel, launch, device, timeout_s,
                             worker_loop)
    try:
        _serve_as_worker(ranks[0], store_addr, parallel, launch, device, timeout_s,
                         worker_loop)
        code = 0
    except Exception as exc:
        print(f"cpserve rank {ranks[0]}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        code = 1
    except (SystemExit, KeyboardInterrupt) as stop:  # SIGTERM or Ctrl-C: stop this node
        code = stop.code if isinstance(stop, SystemExit) else 130
    # After a shutdown by the driver the other ranks are exiting too; otherwise stop them.
    for proc in processes:
        proc.join(timeout=60 if code == 0 else 1)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    return code or (1 if any(p.exitcode != 0 for p in processes) else 0)


class _TorchrunExitBoard:
    """Orders the teardown of ranks started by torchrun, which the driver cannot join.

    A driver that tears its process group down while a worker is closing its own connections
    can abort inside gloo. So, as with spawned ranks (the driver joins them first), the
    driver waits until every worker has closed its group: each worker says so on torchrun's
    rendezvous store (MASTER_ADDR:MASTER_PORT) after `destroy_process_group`.
    """

    def __init__(self, world: int, timeout_s: float) -> None:
        self.world = world
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # Keys are per run and per restart of the job, so a restarted job waits afresh.
        self.prefix = (f"cpserve/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
                       f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/closed/")

    def _store(self) -> dist.TCPStore:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=self.timeout)

    def say_done(self, rank: int) -> None:
        try:
            self._store().set(f"{self.prefix}{rank}", "1")
        except Exception:  # the driver is gone already: nobody is waiting
            pass

    def wait_for_workers(self) -> None:
        try:
            self._store().wait([f"{self.prefix}{r}" for r in range(1, self.world)],
                               self.timeout)
        except Exception:  # a worker died or the store went away: tear down anyway
            pass


class WorkerPool:
    def __init__(self, parallel: ParallelConfig, device: str, worker_loop: WorkerLoop,
                 timeout_s: float | None = None, launch: LaunchConfig | None = None) -> None:
        self.parallel = parallel
        self.launch = launch if launch is not None else LaunchConfig()
        self.worker_loop = worker_loop
        self.world_size = parallel.world_size
        self.timeout_s = timeout_s if timeout_s is not None else default_timeout_s()
        self._processes: list = []
        self._store = None
        self._exit_board: _TorchrunExitBoard | None = None
        self._remote_ranks: list[int] = []  # ranks on other nodes (multi-node launch)
        self._failure: str | None = None
        # One plan at a time: the engine's steps and the keep-alive thread's empty plans.
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self._check_launcher(under_torchrun)
        if self.world_size == 1:
            self.groups, self.device = single_process_groups(), rank_device(device, 0)
        elif under_torchrun:
            self._join_torchrun(device)
        else:
            self._spawn_local(device)
        if self.world_size > 1:
            threading.Thread(target=self._keep_alive, daemon=True).start()

    def _check_launcher(self, under_torchrun: bool) -> None:
        launch = self.launch
        if under_torchrun and launch.nnodes > 1:
            raise ConfigError(f"--nnodes {launch.nnodes} asks cpserve to start the ranks of "
                              "several nodes, but torchrun started this process (RANK is set): "
                              "give the node flags to torchrun only")
        if under_torchrun and launch.executor_backend == "mp":
            raise ConfigError("--distributed-executor-backend mp, but torchrun started this "
                              "process (RANK is set): use external_launcher or leave it out")
        if not under_torchrun and launch.executor_backend == "external_launcher":
            raise ConfigError("--distributed-executor-backend external_launcher: the ranks "
                              "must be started by torchrun (RANK and WORLD_SIZE are not set)")
        if launch.node_rank != 0:
            raise ConfigError(f"--node-rank {launch.node_rank}: only node 0 runs the driver; "
                              "start the other nodes with `cpserve serve ... --headless`")

    def _join_torchrun(self, device: str) -> None:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != self.world_size:
            raise RuntimeError(f"torchrun started {world} ranks, but tensor_parallel_size * "
                               f"prefill_context_parallel_size = {self.world_size}")
        self.device = rank_device(device, int(os.environ.get("LOCAL_RANK", rank)))
        self.groups = _init_distributed(self.parallel, rank, {"init_method": "env://"}, self.device,
                                        self.timeout_s)
        self._exit_board = _TorchrunExitBoard(world, self.timeout_s)
        if rank != 0:
            self.worker_loop(self.groups, self.device)
            dist.destroy_process_group()
            self._exit_board.say_done(rank)
            sys.exit(0)

    def _spawn_local(self, device: str) -> None:
        """Spawn this node's other ranks; with several nodes, wait for theirs too."""
        launch = self.launch
        local_ranks = launch.local_ranks(self.world_size)
        # The driver owns the rendezvous store and drops it at shutdown: on a free loopback
        # port for one node, on --master-addr:--master-port for several.
        host, port = ("127.0.0.1", 0) if launch.nnodes == 1 else (launch.master_addr,
                                                                   launch.master_port)
        try:
            self._store = dist.TCPStore(host, port, self.world_size, is_master=True,
                                        wait_for_workers=False,
                                        timeout=_rendezvous_timeout(self.timeout_s))
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"cannot open the rendezvous store on {host}:{port} (--master-addr"
                              f", --master-port): {exc}") from None
        store_addr = ("127.0.0.1", self._store.port) if launch.nnodes == 1 else (host, port)
        self._processes = _spawn_ranks(local_ranks[1:], store_addr, self.parallel, launch,
                                       device, self.timeout_s, self.worker_loop)
        if launch.nnodes == 1:
            self._wait_for_ranks_to_start()
        threading.Thread(target=self._watch_workers, daemon=True).start()
        _share_cpu_threads(device, len(local_ranks))
        self.device = rank_device(device, 0)
        if launch.nnodes > 1:
            _wait_for_all_ranks(self._store, self.world_size, 0)
        self.groups = _init_distributed(self.parallel, 0, {"store": self._store}, self.device,
                                        self.timeout_s)
        self._remote_ranks = [r for r in range(self.world_size) if r not in local_ranks]

    def _wait_for_ranks_to_start(self) -> None:
        """Starting an interpreter takes seconds on a loaded host, which must not eat into
        the process group's timeout: every rank checks in on the store first. A rank that
        exits meanwhile is reported at once (its own error is printed above)."""
        keys = [f"{_STARTED_KEY}{proc.rank}" for proc in self._processes]
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
        while True:
            try:
                self._store.wait(keys, datetime.timedelta(seconds=0.5))
                return
            except RuntimeError:  # DistStoreError: not all there yet
                pass
            dead = [(p.rank, p.exitcode) for p in self._processes if p.exitcode is not None]
            if dead or time.monotonic() > deadline:
                self._kill_workers()
                what = (f"rank {dead[0][0]} exited with code {dead[0][1]} while starting"
                        if dead else f"ranks did not start within {RENDEZVOUS_TIMEOUT_S:g} s")
                raise WorkerDiedError(f"cpserve worker {what}")

    def _watch_workers(self) -> None:
        """Notice a started rank that exits, so that errors can name it."""
        while self._failure is None:
            for proc in self._processes:
                if proc.exitcode is not None:
                    self._failure = f"rank {proc.rank} exited with code {proc.exitcode}"
                    return
            time.sleep(0.2)

    # The driver's side ---------------------------------------------------------------------
    def run(self, plan: StepPlan, local_work):
        """Send `plan` to every rank, then do the driver's share, `local_work()`.

        Any failure (a rank died, a collective timed out) ends the whole pool and raises
        WorkerDiedError naming the rank when it is known.
        """
        if self.world_size == 1:
            return local_work()
        with self._lock:
            return self._run_locked(plan, local_work)

    def _run_locked(self, plan: StepPlan, local_work):
        if self._failure is not None:
            raise WorkerDiedError(f"cpserve worker {self._failure}; start a new engine")
        try:
            broadcast_plan(plan, self.groups.cpu_group)
            self._last_sent = time.monotonic()
            return local_work()
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}"
        # Raised outside the handler on purpose: the collective's exception holds frames with
        # unfinished communication work, which must not outlive the process group.
        time.sleep(0.5)  # give the watcher a moment to see which rank went away
        self._failure = self._failure or "a rank stopped answering collectives"
        self._kill_workers()
        raise WorkerDiedError(f"cpserve worker {self._failure}: {cause}")

    def _keep_alive(self) -> None:
        """While the driver is idle, send empty plans so that waiting ranks do not time out,
        and so that a rank that died while nothing ran is noticed."""
        interval = self.timeout_s / 4
        while self._failure is None:
            time.sleep(interval / 2)
            if time.monotonic() - self._last_sent < interval:
                continue
            try:
                self.run(StepPlan(), lambda: None)
            except WorkerDiedError:
                return

    def shutdown(self) -> None:
        if self.world_size > 1 and self._failure is None:
            with self._lock:
                try:
                    broadcast_plan(StepPlan(shutdown=True), self.groups.cpu_group)
                except Exception:
                    pass
                self._failure = "pool shut down"
            for proc in self._processes:
                proc.join(timeout=10)
            if self._exit_board is not None:
                self._exit_board.wait_for_workers()
            self._wait_for_remote_ranks()
        self._failure = self._failure or "pool shut down"
        self._kill_workers()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        self._store = None

    def _wait_for_remote_ranks(self) -> None:
        """Ranks on other nodes cannot be joined: as under torchrun, wait until each has
        closed its process group before tearing down ours."""
        if self._remote_ranks and self._store is not None:
            try:
                self._store.wait([_closed_key(r) for r in self._remote_ranks],
                                 datetime.timedelta(seconds=self.timeout_s))
            except Exception:  # a rank died or is unreachable: tear down anyway
                pass

    def _kill_workers(self) -> None:
        for proc in self._processes:
            if proc.is_alive():
                proc.kill()
        for proc in self._processes:
            proc.join(timeout=5)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
