#!/bin/bash
# The host side of an in_job driver in the image (parsl_aurora.bridge.HostLocalProvider):
#   bash in_job_host.sh IMAGE COMMAND...
# runs COMMAND (the driver) in IMAGE and, for as long as it runs, starts the blocks it asks for
# here on the host, where PALS's mpiexec and apptainer are: a block's script starts one worker
# pool per node with mpiexec, each pool back in the image. Only bash, coreutils, util-linux's
# setsid and apptainer are needed, what every Aurora compute node has: the image carries this
# file (`apptainer exec IMAGE parsl-aurora host-launcher` prints it).
#
# The channel is a FIFO in a private folder under /tmp (0700, so only this user can write a
# request; apptainer binds /tmp). A request is one line, `ID VERB ARG`:
#   submit SCRIPT  run SCRIPT (a block script the driver wrote, a file this user owns) as
#                  Parsl's LocalProvider does: SCRIPT.ec is "-" while it runs, then its exit
#                  status; output in SCRIPT.out and SCRIPT.err; reply "ok PID"
#   alive PID      reply "yes" while that block runs, else "no"
#   cancel PID     SIGTERM to that block's process group; reply "ok"
# Only blocks this channel started can be asked about or cancelled. The reply lands in
# ID.reply (written under another name, then renamed).
set -u
image=$1
shift
chan=$(mktemp -d /tmp/parsl-aurora-host.XXXXXX) || exit 1
mkfifo -m 600 "$chan/requests" || exit 1
started=" "

answer() {  # VERB ARG -> the reply line
    case $1 in
    submit)
        local script=$2
        if [[ $script != /* || ! -f $script || ! -O $script ]]; then
            echo "error: not a block script of this user: $script"
            return
        fi
        echo - > "$script.ec" || { echo "error: cannot write $script.ec"; return; }
        # Its own session, hence its own process group, as Parsl's execute_wait gives it, so a
        # cancel ends the block and whatever it started, and nothing of this script.
        setsid bash -c 'bash "$1" > "$1.out" 2> "$1.err"; echo $? > "$1.ec"' block "$script" \
            < /dev/null > /dev/null 2>&1 &
        started+="$! "
        echo "$!" >> "$chan/blocks"
        echo "ok $!" ;;
    alive)
        if [[ $started == *" $2 "* ]] && kill -0 "$2" 2> /dev/null; then echo yes; else echo no; fi ;;
    cancel)
        if [[ $started != *" $2 "* ]]; then echo "error: no block $2 started here"; return; fi
        kill -TERM -- "-$2" 2> /dev/null
        echo ok ;;
    *)
        echo "error: unknown request $1" ;;
    esac
}

serve() {
    # Opened for reading and writing: the loop never sees end-of-file between requests.
    exec 3<> "$chan/requests"
    while read -r -u 3 id verb arg; do
        [[ $id =~ ^[A-Za-z0-9_.-]+$ && $arg =~ ^[A-Za-z0-9_./+:=-]*$ ]] || continue
        answer "$verb" "$arg" > "$chan/$id.part" && mv -f "$chan/$id.part" "$chan/$id.reply"
    done
}

serve &
server=$!
bind=()
# The job's node file, under PBS's spool folder, which apptainer does not bind.
[ -n "${PBS_NODEFILE:-}" ] && bind=(--bind "$PBS_NODEFILE")
PARSL_AURORA_HOST_LAUNCH=$chan apptainer exec "${bind[@]}" "$image" "$@"
rc=$?
kill "$server" 2> /dev/null
wait "$server" 2> /dev/null
# Blocks the driver did not cancel end with it, as a job's processes end with the job.
if [ -f "$chan/blocks" ]; then
    while read -r pid; do kill -TERM -- "-$pid" 2> /dev/null; done < "$chan/blocks"
fi
rm -rf "$chan"
exit "$rc"
