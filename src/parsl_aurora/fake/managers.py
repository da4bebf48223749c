"""Simulated worker pools: many of Parsl 2025.1.13's managers in one process, for the scale bench.

`python -m parsl_aurora.fake.managers --managers K ARGS`, ARGS being process_worker_pool.py's.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import os
import pickle
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zmq
from parsl import curvezmq
from parsl.addresses import tcp_url
from parsl.app.errors import RemoteExceptionWrapper
from parsl.executors.execute_task import execute_task
from parsl.executors.high_throughput import process_worker_pool as pool
from parsl.executors.high_throughput.probe import probe_addresses
from parsl.serialize import serialize

# Parsl's Manager methods log to a module global that only its __main__ sets.
pool.logger = logging.getLogger(__name__)
# Probes at once in one process: each is a ZMQ context with its own I/O thread, and a missed
# one holds its thread for the probe's timeout.
PROBES = 16
# How often each process rewrites its report (the bench reads it while the run goes on).
REPORT_EVERY = 1.0


class Sim:
    """One manager: the attributes Parsl's Manager.create_reg_message and
    heartbeat_to_incoming read, so the messages are built by Parsl's own code."""

    def __init__(self, uid: str, block_id: str, worker_count: int, prefetch_capacity: int):
        self.uid, self.block_id = uid, block_id
        self.worker_count, self.prefetch_capacity = worker_count, prefetch_capacity
        self.start_time = time.time()
        self.task_incoming = self.result_outgoing = None
        self.state = "probing"  # then running, or probe_missed, lost, drained
        self.last_beat = self.last_contact = 0.0
        self.beat_sent: float | None = None
        self.registered_at: float | None = None
        self.misses = 0  # address probes that missed the interchange

    def connect(self, ctx, task_url: str, result_url: str) -> None:
        """As Manager.__init__ and pull_tasks: two DEALERs named by the uid, then register."""
        for name, url in (("task_incoming", task_url), ("result_outgoing", result_url)):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self.uid.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(url)
            setattr(self, name, sock)
        self.task_incoming.send(pool.Manager.create_reg_message(self))
        # The first heartbeat one period after registering, as in pull_tasks.
        self.state = "running"
        self.last_beat = self.last_contact = time.time()

    def close(self, state: str) -> None:
        self.state = state
        for sock in (self.task_incoming, self.result_outgoing):
            if sock is not None:
                sock.close()


def run_task(task: dict) -> tuple[bytes, float]:
    """One task through Parsl's execute_task, packaged as the pool's worker() packages it, and
    the seconds its worker stays busy under --hold: a float the task returns, else none."""
    tid = task["task_id"]
    held = 0.0
    try:
        value = execute_task(task["buffer"])
        held = value if isinstance(value, float) else 0.0
        package = {"type": "result", "task_id": tid,
                   "result": serialize(value, buffer_threshold=1000000)}
    except Exception:  # noqa: BLE001 - a task's failure is its result, as in the pool
        package = {"type": "result", "task_id": tid,
                   "exception": serialize(RemoteExceptionWrapper(*sys.exc_info()))}
    return pickle.dumps(package), held


class Held:
    """Results kept back until their tasks' time is up (--hold), and the worker-seconds they
    have kept workers busy: tasks of any length without spending this machine's CPU."""

    def __init__(self):
        self.due: list[tuple[float, int, float, Sim, bytes]] = []
        self.done_s, self.count = 0.0, 0

    def add(self, now: float, seconds: float, sim: Sim, result: bytes) -> None:
        self.count += 1
        heapq.heappush(self.due, (now + seconds, self.count, now, sim, result))

    def ready(self, now: float) -> dict[Sim, list[bytes]]:
        """The results due by now, by manager."""
        out: dict[Sim, list[bytes]] = {}
        while self.due and self.due[0][0] <= now:
            due, _, start, sim, result = heapq.heappop(self.due)
            self.done_s += due - start
            out.setdefault(sim, []).append(result)
        return out

    def busy_seconds(self, now: float) -> float:
        """Worker-seconds so far: each task's length once done, its time so far until then."""
        return self.done_s + sum(min(now, due) - start for due, _, start, _, _ in self.due)

    def next_due(self, default: float) -> float:
        return self.due[0][0] if self.due else default


def worker_count(a) -> int:
    """As the pool counts its workers (memory not considered)."""
    cores = int(os.environ.get("PARSL_CORES") or os.cpu_count() or 1)
    most = float(a.max_workers_per_node)
    count = min(most, math.floor(cores / float(a.cores_per_worker)))
    if a.available_accelerators:
        count = min(count, len(a.available_accelerators))
    return int(count)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--managers", type=int, required=True, help="managers in this process")
    p.add_argument("--starts", type=int, default=1,
                   help="probes a manager makes (worker_pool_guard.sh's STARTS when it runs "
                        "under the guard, which starts a pool again after a missed probe)")
    p.add_argument("--no-probe", action="store_true",
                   help="connect to the first address without Parsl's probe")
    p.add_argument("--hold", action="store_true",
                   help="a task returning a float keeps its worker that many seconds before "
                        "its result is sent")
    p.add_argument("-a", "--addresses", required=True)
    p.add_argument("--task_port", required=True)
    p.add_argument("--result_port", required=True)
    p.add_argument("--cert_dir", default="None")
    p.add_argument("--logdir", default="process_worker_pool_logs")
    p.add_argument("-b", "--block_id", default="0")
    p.add_argument("-c", "--cores_per_worker", default="1.0")
    p.add_argument("-p", "--prefetch_capacity", type=int, default=0)
    p.add_argument("--max_workers_per_node", default=float("inf"))
    p.add_argument("--hb_period", type=int, default=30)
    p.add_argument("--hb_threshold", type=int, default=120)
    p.add_argument("--address_probe_timeout", type=int, default=30)
    p.add_argument("--available-accelerators", nargs="*", default=[])
    a, _ = p.parse_known_args(argv)  # the rest (affinity, MPI, polling) changes nothing here
    return a


def report(path: Path, sims: list[Sim], rtts: list[float], tasks: int, started: float,
           held: Held) -> None:
    states: dict[str, int] = {}
    for s in sims:
        states[s.state] = states.get(s.state, 0) + 1
    registered = [s.registered_at - started for s in sims if s.registered_at is not None]
    states["probe_misses"] = sum(s.misses for s in sims)
    tmp = path.with_suffix(".tmp")
    now = time.time()
    tmp.write_text(json.dumps({"pid": os.getpid(), "at": now, "busy_s": held.busy_seconds(now),
                               "managers": len(sims), "states": states,
                               "registered": len(registered),
                               "last_registered": max(registered, default=None),
                               "rtts": rtts, "tasks": tasks}))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    from parsl_aurora.executors import raise_open_file_limit

    a = parse(sys.argv[1:] if argv is None else argv)
    raise_open_file_limit()  # two sockets per manager, each with its own mailbox
    started = time.time()
    sims = [Sim(f"{a.block_id}-{os.getpid()}-{i}", a.block_id, worker_count(a),
                a.prefetch_capacity) for i in range(a.managers)]
    out = Path(a.logdir, f"sim-{a.block_id}-{os.getpid()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rtts: list[float] = []
    held = Held()
    report(out, sims, rtts, 0, started, held)
    # Every manager of a block probes at once, as one mpiexec starts them; each probe is
    # Parsl's own, so its race (#1666) is kept: a missed probe is a pool that exits 5.
    probes = ThreadPoolExecutor(max_workers=min(PROBES, a.managers))
    if a.no_probe:
        probing = {Future(): sim for sim in sims}
        for future in probing:
            future.set_result(a.addresses.split(",")[0])
    else:
        probing = {probes.submit(probe_addresses, a.addresses.split(","), a.task_port,
                                 timeout=a.address_probe_timeout): sim for sim in sims}
    ctx = curvezmq.ClientContext(None if a.cert_dir == "None" else a.cert_dir)
    poller = zmq.Poller()
    by_socket = {}

    def connect_probed() -> None:
        for future in [f for f in probing if f.done()]:
            sim, address = probing.pop(future), future.result()
            if not address:
                sim.misses += 1
                if sim.misses < a.starts:  # as worker_pool_guard.sh starts the pool again
                    probing[probes.submit(probe_addresses, a.addresses.split(","), a.task_port,
                                          timeout=a.address_probe_timeout)] = sim
                else:
                    sim.close("probe_missed")
                continue
            sim.connect(ctx, tcp_url(address, a.task_port), tcp_url(address, a.result_port))
            poller.register(sim.task_incoming, zmq.POLLIN)
            by_socket[sim.task_incoming] = sim

    result_beat = pickle.dumps({"type": "heartbeat"})
    tasks, last_report = 0, 0.0
    while by_socket or probing:
        connect_probed()
        now = time.time()
        for sim in list(by_socket.values()):
            if now >= sim.last_beat + a.hb_period:
                pool.Manager.heartbeat_to_incoming(sim)
                sim.result_outgoing.send_multipart([result_beat])
                sim.last_beat = sim.beat_sent = now
            if now >= sim.last_contact + a.hb_threshold:
                # The pool gives up on the interchange, as pull_tasks does.
                poller.unregister(sim.task_incoming)
                del by_socket[sim.task_incoming]
                sim.close("lost")
        for sim, results in held.ready(now).items():
            if sim.state == "running":
                sim.result_outgoing.send_multipart(results)
        if now >= last_report + REPORT_EVERY:
            report(out, sims, rtts, tasks, started, held)
            last_report = now
        due = min((min(s.last_beat + a.hb_period, s.last_contact + a.hb_threshold)
                   for s in by_socket.values()), default=now + REPORT_EVERY)
        due = min(due, held.next_due(due))
        wait = min(due - time.time(), 0.01 if probing else REPORT_EVERY)
        for sock, _ in poller.poll(timeout=max(0.0, wait) * 1000):
            sim = by_socket[sock]
            _, message = sock.recv_multipart()
            received = time.time()
            sim.last_contact = received
            if sim.registered_at is None:
                sim.registered_at = received
            work = pickle.loads(message)
            if work == pool.HEARTBEAT_CODE:
                if sim.beat_sent is not None:
                    rtts.append(received - sim.beat_sent)
                    sim.beat_sent = None
            elif work == pool.DRAINED_CODE:
                poller.unregister(sock)
                del by_socket[sock]
                sim.close("drained")
            else:
                done = [run_task(t) for t in work]
                tasks += len(work)
                if a.hold:
                    for result, seconds in [d for d in done if d[1] > 0]:
                        held.add(received, seconds, sim, result)
                    done = [d for d in done if d[1] <= 0]
                if done:
                    sim.result_outgoing.send_multipart([result for result, _ in done])
    report(out, sims, rtts, tasks, started, held)
    probes.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
