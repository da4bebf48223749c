#!/bin/bash
# worker_pool_guard.sh process_worker_pool.py ARGS...: run Parsl's worker pool and, when it ends
# for any reason, end every process it started.
#
# Killed with -9 (by hand, or by the OOM killer), Parsl 2025.1.13's pool leaves its
# multiprocessing manager and resource tracker behind. They hold mpiexec's output open, so the
# block never ends: the scheduler keeps the nodes, and the tasks the pool lost wait for a new
# block that cannot start. Started in its own process group (set -m), the pool can be ended
# whole; its exit status is passed on, so a crash still reads as a failed block.
#
# The pool exits 5 when its address probe missed the interchange ("No viable address found"),
# which on a fast network it can while the interchange is there: the probe attaches its
# monitor after connecting and may miss the event (Parsl #1666: a tenth of the pools at 600-800
# nodes; fixed upstream after 2025.1.13). Such a pool is started again, up to STARTS times.
STARTS=3
MISSED_PROBE=5
set -m
stopping=
# mpiexec ending the rank or Parsl cancelling the block signals us; pass it to the whole pool.
trap 'stopping=1; kill -TERM -- "-$pool" 2>/dev/null' TERM INT HUP
for ((start = 1; start <= STARTS; start++)); do
    "$@" &
    pool=$!
    while :; do
        wait "$pool"
        rc=$?
        kill -0 "$pool" 2>/dev/null || break  # gone, rather than wait interrupted by a signal
    done
    kill -KILL -- "-$pool" 2>/dev/null
    [[ $rc == "$MISSED_PROBE" && -z $stopping ]] || break
    if ((start < STARTS)); then
        echo "worker_pool_guard.sh: the pool's address probe missed the interchange" \
             "(exit $MISSED_PROBE, Parsl #1666); starting it again" >&2
    fi
done
exit "$rc"
