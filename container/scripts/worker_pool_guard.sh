#!/bin/bash
# worker_pool_guard.sh process_worker_pool.py ARGS...: run Parsl's worker pool and, when it ends
# for any reason, end every process it started.
#
# Killed with -9 (by hand, or by the OOM killer), Parsl 2025.1.13's pool leaves its
# multiprocessing manager and resource tracker behind. They hold mpiexec's output open, so the
# block never ends: the scheduler keeps the nodes, and the tasks the pool lost wait for a new
# block that cannot start. Started in its own process group (set -m), the pool can be ended
# whole; its exit status is passed on, so a crash still reads as a failed block.
set -m
"$@" &
pool=$!
# mpiexec ending the rank or Parsl cancelling the block signals us; pass it to the whole pool.
trap 'kill -TERM -- "-$pool" 2>/dev/null' TERM INT HUP
while :; do
    wait "$pool"
    rc=$?
    kill -0 "$pool" 2>/dev/null || break  # gone, rather than wait interrupted by a signal
done
kill -KILL -- "-$pool" 2>/dev/null
exit "$rc"
