#!/usr/bin/env bash
# The project's copy of ../shared/tools/install-openpbs.sh (read-only there), extended so the
# look-alike has what Aurora's PBS does beyond its queue table (docs/fake-cluster.md):
#   * prod is a routing queue to small (1 node, 12 h) and medium (2 nodes, 18 h), which refuse
#     direct submission (Aurora: small/medium/large by node count); limits per project;
#   * capacity (5 queued or running and 2 running per user, 168 h);
#   * a MoM prologue that fails the start of every job of the account `fail-start` (exit 2:
#     PBS requeues it and counts the attempt), so `qsub -A fail-start -W run_count=20` is held
#     after one failed start, as Aurora holds a job that fails to start ("job held, too many
#     failed attempts to run").
#
# install-openpbs.sh - build, install, configure and start a real OpenPBS on
# one Debian 12 host, configured so that PBS clients see a small
# "Aurora-like" system:
#   server  aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov  (job ids N.aurora-pbs-0001...)
#   nodes   x4102c0s0b0n0, x4102c0s1b0n0 (one pbs_mom each, 208 ncpus each,
#           PBS_NODEFILE lines x4102c0s<k>b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov)
#   queues  debug, debug-scaling, prod (routing), small, medium, capacity (plus the stock
#           workq, still the default)
#   custom job-wide resource `filesystems` (string), so
#   `#PBS -l filesystems=home:flare` is accepted
#   flatuid=true, job_history_enable=true (qstat -x works)
#   auth: resvport (default, setuid pbs_iff) and munge (munged is started); munge
#   is what makes qsub/qstat work inside an Apptainer container:
#     apptainer exec --bind /opt/pbs --bind /etc/pbs.conf --bind /run/munge \
#       --env PBS_AUTH_METHOD=munge --env LD_LIBRARY_PATH=/opt/pbs/lib/container-extra \
#       IMAGE.sif /opt/pbs/bin/qsub -f ...      (-f: no background qsub daemon)
#
# Usage (as root):
#   install-openpbs.sh SRC         SRC = OpenPBS source directory or tarball
#                                  (.tar, .tar.gz, .tgz). Installs build/runtime
#                                  packages, builds (skipped when /opt/pbs was already
#                                  built from the same source), installs to /opt/pbs,
#                                  configures, starts PBS and runs a smoke job.
#   install-openpbs.sh start       start server/sched/comm and all MoMs
#   install-openpbs.sh stop        stop everything this script starts
#   install-openpbs.sh status
#
# Safe to re-run: every step checks current state first.
#
# Requirements / side effects (all idempotent):
#   * root; apt-get access to Debian 12 mirrors (build + runtime packages)
#   * adds /32 addresses from TEST-NET-2 (198.51.100.0/24) to `lo`, because
#     PBS refuses loopback (127.x) addresses for its own host names and one
#     address per MoM is needed to get distinct host names in $PBS_NODEFILE
#   * adds lines tagged "# openpbs-sim" to /etc/hosts (existing names untouched)
#   * writes /etc/pbs.conf, /etc/pbs-moms/<node>.conf, /var/spool/pbs,
#     /var/spool/pbs-moms/<node>; creates user $PBS_SIM_USER (default pbsuser)
#
# Tunables (environment):
#   PBS_PREFIX (/opt/pbs)  OPENPBS_BUILD_DIR (/tmp/openpbs-build)
#   PBS_SIM_SERVER  PBS_SIM_NODES ("x4102c0s0b0n0 x4102c0s1b0n0")
#   PBS_SIM_NODE_DOMAIN  PBS_SIM_NET (198.51.100)  PBS_SIM_NCPUS (208)
#   PBS_SIM_USER (pbsuser)  PBS_SIM_SMOKE (1)  PBS_SIM_FORCE_BUILD (0)
#   PBS_SIM_MIN_CHECK_POLL (1) PBS_SIM_MAX_CHECK_POLL (5): MoM resource-poll
#     interval in s (PBS defaults 10/120); bounds how late walltime is enforced.
set -euo pipefail

PREFIX=${PBS_PREFIX:-/opt/pbs}
BUILD_DIR=${OPENPBS_BUILD_DIR:-/tmp/openpbs-build}
SERVER_FQDN=${PBS_SIM_SERVER:-aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov}
NODES=${PBS_SIM_NODES:-"x4102c0s0b0n0 x4102c0s1b0n0"}
NODE_DOMAIN=${PBS_SIM_NODE_DOMAIN:-hostmgmt2102.cm.aurora.alcf.anl.gov}
NET=${PBS_SIM_NET:-198.51.100}
NCPUS=${PBS_SIM_NCPUS:-208}
TEST_USER=${PBS_SIM_USER:-pbsuser}
SMOKE=${PBS_SIM_SMOKE:-1}
FORCE_BUILD=${PBS_SIM_FORCE_BUILD:-0}
MIN_POLL=${PBS_SIM_MIN_CHECK_POLL:-1}
MAX_POLL=${PBS_SIM_MAX_CHECK_POLL:-5}
# Execution queues; prod, the routing queue in front of small and medium, is made apart.
QUEUES="debug debug-scaling small medium capacity"
# Jobs of this account fail to start (the MoM prologue below).
FAIL_ACCOUNT=fail-start

SERVER_HOME=/var/spool/pbs
MOM_HOME_BASE=/var/spool/pbs-moms
MOM_CONF_DIR=/etc/pbs-moms
TAG="# openpbs-sim"
SERVER_IP="$NET.1"
export PATH=$PREFIX/bin:$PREFIX/sbin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# `cmd | grep -q` is unsafe under pipefail (grep exits early, cmd gets SIGPIPE):
# has PATTERN CMD... -> true if CMD's stdout contains PATTERN
has() { local pat=$1 out; shift; out=$("$@" 2>/dev/null) || true; grep -q -- "$pat" <<< "$out"; }
log() { printf '[install-openpbs %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

node_ip()   { echo "$NET.$((11 + $1))"; }        # node index -> address
node_port() { echo $((15002 + 10 * $1)); }         # MoM service port (RM = +1)
node_list() { local i=0 n; for n in $NODES; do echo "$i $n"; i=$((i + 1)); done; }

BUILD_DEPS="gcc g++ make libtool autoconf automake pkg-config libhwloc-dev libx11-dev
 libxt-dev libedit-dev libical-dev libncurses-dev perl postgresql-server-dev-all
 postgresql-contrib python3-dev tcl-dev tk-dev swig libexpat1-dev libssl-dev
 libxext-dev libxft-dev libcjson-dev"
RUN_DEPS="expat libedit2 postgresql python3 sudo tcl tk libical3 libcjson1 iproute2 procps"
# munge: second auth method, needed for PBS clients inside (user-namespace)
# containers where the setuid pbs_iff used by the default "resvport" auth cannot work.
# libmunge-dev is needed at run time: PBS dlopen()s the unversioned "libmunge.so".
MUNGE_DEPS="munge libmunge-dev"

install_deps() {
	local missing=() p
	for p in $BUILD_DEPS $RUN_DEPS $MUNGE_DEPS; do
		has 'ok installed' dpkg-query -W -f='${Status}' "$p" || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		log "apt-get install ${missing[*]}"
		[ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ] \
			|| apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
	else
		log "build/runtime packages already installed"
	fi
}

source_id() {   # content hash of the source (tarball bytes, or source files of a dir)
	local src=$1
	if [ -f "$src" ]; then
		sha256sum "$src" | cut -d' ' -f1
	else
		(cd "$src" && find . -type f \( -name '*.[ch]' -o -name '*.py' -o -name '*.sh' \
			-o -name 'configure.ac' -o -name 'Makefile.am' -o -name '*.m4' \) \
			! -path './autom4te.cache/*' ! -name '*_wrap.c' ! -name 'pbs_config.h' -print0 \
			| LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
	fi
}

build_install() {
	local src=$1 id stamp=$PREFIX/.openpbs-source-id
	[ -e "$src" ] || die "source $src not found"
	src=$(readlink -f "$src")
	id=$(source_id "$src")
	if [ "$FORCE_BUILD" != 1 ] && [ -x "$PREFIX/sbin/pbs_server.bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$id" ]; then
		log "$PREFIX already built from this source ($id); skipping build"
		return 0
	fi
	log "preparing build tree $BUILD_DIR"
	rm -rf "$BUILD_DIR"; mkdir -p "$BUILD_DIR"
	if [ -f "$src" ]; then
		tar -xf "$src" -C "$BUILD_DIR"
	else
		tar -C "$src" --exclude=./autom4te.cache -cf - . | tar -C "$BUILD_DIR" -xf -
	fi
	local top; top=$(dirname "$(find "$BUILD_DIR" -maxdepth 2 -name configure.ac | head -1)")
	[ -f "$top/configure.ac" ] || die "no configure.ac in $src"
	local t0=$SECONDS
	(
		cd "$top"
		[ -x configure ] || ./autogen.sh > autogen.log 2>&1
		# --with-python=/usr: never pick up a pyenv/venv python3 from PATH
		./configure --prefix="$PREFIX" --with-python=/usr > configure.log 2>&1
		make -j"$(nproc)" > make.log 2>&1
		make install > make-install.log 2>&1
	) || die "build failed; see logs in $top"
	log "built and installed in $((SECONDS - t0)) s"
	echo "$id" > "$stamp"
	# Creates PBS_HOME skeleton, /etc/init.d/pbs, /etc/profile.d/pbs.{sh,csh}.
	# It complains about update-rc.d/systemd when there is no init system; harmless.
	"$PREFIX/libexec/pbs_postinstall" > "$BUILD_DIR/postinstall.log" 2>&1 \
		|| { cat "$BUILD_DIR/postinstall.log"; die "pbs_postinstall failed"; }
}

setup_network() {
	local ip i n
	for ip in "$SERVER_IP" $(node_list | while read -r i n; do node_ip "$i"; done); do
		has " $ip/" ip -4 -o addr show dev lo || ip addr add "$ip/32" dev lo \
			|| die "cannot add $ip to lo (need CAP_NET_ADMIN)"
	done
	local want tmp
	want=$( { echo "$SERVER_IP $SERVER_FQDN ${SERVER_FQDN%%.*} $TAG"
		node_list | while read -r i n; do echo "$(node_ip "$i") $n.$NODE_DOMAIN $n $TAG"; done; } )
	if [ "$(grep -F "$TAG" /etc/hosts || true)" != "$want" ]; then
		tmp=$(grep -vF "$TAG" /etc/hosts || true)
		printf '%s\n%s\n' "$tmp" "$want" > /etc/hosts   # in place: /etc/hosts may be a bind mount
		log "updated /etc/hosts"
	fi
}

write_if_changed() {  # path content -> returns 0 if changed
	local path=$1 content=$2
	if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then return 1; fi
	printf '%s\n' "$content" > "$path"; return 0
}

CONF_CHANGED=0
write_configs() {
	local i n
	write_if_changed /etc/pbs.conf "PBS_SERVER=$SERVER_FQDN
PBS_START_SERVER=1
PBS_START_SCHED=1
PBS_START_COMM=1
PBS_START_MOM=0
PBS_EXEC=$PREFIX
PBS_HOME=$SERVER_HOME
PBS_CORE_LIMIT=unlimited
PBS_LEAF_NAME=$SERVER_FQDN
PBS_SUPPORTED_AUTH_METHODS=resvport,munge" && CONF_CHANGED=1
	chmod 644 /etc/pbs.conf
	mkdir -p "$MOM_CONF_DIR"
	node_list | while read -r i n; do
		local home=$MOM_HOME_BASE/$n port; port=$(node_port "$i")
		write_if_changed "$MOM_CONF_DIR/$n.conf" "PBS_SERVER=$SERVER_FQDN
PBS_START_SERVER=0
PBS_START_SCHED=0
PBS_START_COMM=0
PBS_START_MOM=1
PBS_EXEC=$PREFIX
PBS_HOME=$home
PBS_CORE_LIMIT=unlimited
PBS_LEAF_NAME=$n
PBS_MOM_NODE_NAME=$n
PBS_MOM_SERVICE_PORT=$port
PBS_MANAGER_SERVICE_PORT=$((port + 1))" && touch "$MOM_CONF_DIR/.$n.restart" || true
		# MoM-only PBS_HOME, same layout as pbs_postinstall creates
		local d m
		while read -r m d; do mkdir -p "$home/$d"; chmod "$m" "$home/$d"; done <<-EOF
			0755 .
			0755 aux
			0700 checkpoint
			0755 mom_logs
			0751 mom_priv
			0751 mom_priv/jobs
			0750 mom_priv/hooks
			0750 mom_priv/hooks/tmp
			1777 spool
			1777 undelivered
		EOF
		cp "$SERVER_HOME/pbs_environment" "$home/pbs_environment" 2>/dev/null \
			|| echo "PATH=/bin:/usr/bin" > "$home/pbs_environment"
		"$PREFIX/bin/qstat" --version | sed -e 's/^.* = //' > "$home/pbs_version"
		# $usecp: deliver .o/.e files with cp (shared-filesystem semantics, as on
		# Aurora) instead of scp/pbs_rcp to the submit host, which hangs/fails here.
		# A start that fails: prologue exit 2 requeues the job and counts the attempt.
		write_if_changed "$home/mom_priv/prologue" "#!/bin/sh
# Look-alike of a node where jobs cannot start: the account $FAIL_ACCOUNT's never do.
$PREFIX/bin/qstat -f \"\$1\" 2>/dev/null | grep -q '^ *Account_Name = $FAIL_ACCOUNT\$' && exit 2
exit 0" || true
		chmod 0700 "$home/mom_priv/prologue"
		write_if_changed "$home/mom_priv/config" "\$restrict_user_maxsysid 999
\$usecp *:/ /
\$min_check_poll $MIN_POLL
\$max_check_poll $MAX_POLL" && touch "$home/.config-changed" || true
	done
	chmod 4755 "$PREFIX/sbin/pbs_iff" "$PREFIX/sbin/pbs_rcp"
	# Libraries a PBS client in a Debian-12-based container needs besides the
	# --bind-mounted $PREFIX: qstat links libcjson.so.1; munge auth dlopen()s libmunge.so.
	mkdir -p "$PREFIX/lib/container-extra"
	cp -L /usr/lib/x86_64-linux-gnu/libcjson.so.1 "$PREFIX/lib/container-extra/"
	cp -L /usr/lib/x86_64-linux-gnu/libmunge.so.2 "$PREFIX/lib/container-extra/libmunge.so.2"
	ln -sf libmunge.so.2 "$PREFIX/lib/container-extra/libmunge.so"
}

start_munge() {
	if [ ! -S /run/munge/munge.socket.2 ] || ! munge -n 2>/dev/null | unmunge > /dev/null 2>&1; then
		[ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key; chown munge: /etc/munge/munge.key; }
		/etc/init.d/munge start > /dev/null
		sleep 1
		munge -n | unmunge > /dev/null || die "munged not working"
		log "munged started"
	fi
}

mom_ctl() {  # start|stop|status for every MoM
	local i n
	node_list | while read -r i n; do
		if [ "$1" = start ] && [ -f "$MOM_CONF_DIR/.$n.restart" ]; then  # its pbs.conf changed
			PBS_CONF_FILE=$MOM_CONF_DIR/$n.conf /etc/init.d/pbs stop > /dev/null 2>&1 || true
			rm -f "$MOM_CONF_DIR/.$n.restart"
		fi
		PBS_CONF_FILE=$MOM_CONF_DIR/$n.conf /etc/init.d/pbs "$1" 2>&1 | sed "s/^/[mom $n] /" \
			| grep -v 'ulimit: max locked memory' || true
		if [ "$1" = start ] && [ -f "$MOM_HOME_BASE/$n/.config-changed" ]; then
			local lock=$MOM_HOME_BASE/$n/mom_priv/mom.lock
			[ -s "$lock" ] && kill -HUP "$(head -1 "$lock")" && log "MoM $n: re-read mom_priv/config"
			rm -f "$MOM_HOME_BASE/$n/.config-changed"
		fi
	done
}

server_up() { "$PREFIX/bin/qstat" -B > /dev/null 2>&1; }

start_all() {
	start_munge
	/etc/init.d/pbs start 2>&1 | grep -v 'ulimit: open files' || true
	for _ in $(seq 60); do server_up && break; sleep 1; done
	server_up || die "pbs_server did not come up (see $SERVER_HOME/server_logs)"
	mom_ctl start
}

stop_all() {
	mom_ctl stop
	/etc/init.d/pbs stop || true
}

qm() { "$PREFIX/bin/qmgr" -c "$1"; }

configure_server() {
	local i n q
	qm "set server flatuid = true"
	qm "set server job_history_enable = true"
	qm "set server scheduler_iteration = 10"
	qm "list resource filesystems" > /dev/null 2>&1 || qm "create resource filesystems type=string"
	for q in $QUEUES; do
		qm "list queue $q" > /dev/null 2>&1 || qm "create queue $q queue_type=execution"
		qm "set queue $q enabled = true"
		qm "set queue $q started = true"
	done
	# prod: made by an older version of this script as an execution queue; now Aurora's
	# routing queue (it routes at qsub: a job no destination takes is refused there, "qsub:
	# Job rejected by all possible destinations", exit 191).
	if has 'queue_type = Execution' qm "list queue prod"; then qm "delete queue prod"; fi
	qm "list queue prod" > /dev/null 2>&1 || qm "create queue prod queue_type=route"
	qm "set queue prod route_destinations = small"
	qm "set queue prod route_destinations += medium"
	qm "set queue prod resources_max.walltime = 24:00:00"
	qm "set queue prod enabled = true"
	qm "set queue prod started = true"
	qm "set queue debug resources_max.walltime = 01:00:00"
	qm "set queue debug-scaling resources_max.walltime = 01:00:00"
	# prod's destinations, scaled to two nodes; only prod may send jobs there ("qsub: Access
	# to queue is denied", exit 174); 10 running and 100 queued per project, as on Aurora.
	local q lo hi wall
	while read -r q lo hi wall; do
		qm "set queue $q from_route_only = true"
		qm "set queue $q resources_min.nodect = $lo"
		qm "set queue $q resources_max.nodect = $hi"
		qm "set queue $q resources_max.walltime = $wall"
		qm "set queue $q max_queued = [p:PBS_GENERIC=100]"
		qm "set queue $q max_run = [p:PBS_GENERIC=10]"
	done <<-EOF
		small 1 1 12:00:00
		medium 2 2 18:00:00
	EOF
	qm "set queue capacity resources_max.walltime = 168:00:00"
	qm "set queue capacity max_queued = [u:PBS_GENERIC=5]"
	qm "set queue capacity max_run = [u:PBS_GENERIC=2]"
	# Aurora's per-user limits: one queued-or-running job in debug and debug-scaling, five in
	# capacity-like queues. A second qsub is refused: "qsub: would exceed queue generic's per-user
	# limit", exit 38.
	qm "set queue debug max_queued = [u:PBS_GENERIC=1]"
	qm "set queue debug-scaling max_queued = [u:PBS_GENERIC=1]"
	node_list | while read -r i n; do
		local port want_mom have; port=$(node_port "$i"); want_mom="$n.$NODE_DOMAIN"
		have=$("$PREFIX/bin/pbsnodes" -v "$n" 2>/dev/null | awk '/ Mom = /{m=$3} / Port = /{p=$3} END{print m":"p}' || true)
		if [ "$have" != "$want_mom:$port" ]; then
			[ "$have" != ":" ] && qm "delete node $n"
			qm "create node $n Mom=$n,Port=$port"
			log "created node $n (Mom=$want_mom port $port)"
		fi
		qm "set node $n resources_available.ncpus = $NCPUS"
	done
}

wait_nodes_free() {
	local n ok
	for _ in $(seq 60); do
		ok=1
		for n in $NODES; do
			has 'state = free' "$PREFIX/bin/pbsnodes" -v "$n" || ok=0
		done
		[ $ok = 1 ] && { log "nodes free: $NODES"; return 0; }
		sleep 1
	done
	"$PREFIX/bin/pbsnodes" -av; die "nodes did not become free"
}

ensure_user() {
	id "$TEST_USER" > /dev/null 2>&1 || { useradd -m -s /bin/bash "$TEST_USER"; log "created user $TEST_USER"; }
}

smoke_test() {
	local nn; nn=$(echo $NODES | wc -w)
	local dir; dir=$(su - "$TEST_USER" -c 'mktemp -d /tmp/openpbs-smoke.XXXXXX')
	local id
	id=$(su - "$TEST_USER" -c "cd $dir && printf '%s\n' '#PBS -l select=$nn:ncpus=$NCPUS' \
		'#PBS -l walltime=0:01:00' '#PBS -l filesystems=home:flare' '#PBS -A smoke' \
		'#PBS -q debug' '#PBS -N smoke' 'cat \$PBS_NODEFILE' | $PREFIX/bin/qsub -f")
	log "smoke job $id submitted"
	for _ in $(seq 90); do
		has 'job_state = F' su - "$TEST_USER" -c "$PREFIX/bin/qstat -x -f $id" && break
		sleep 1
	done
	local out; out=$(cat "$dir"/smoke.o* 2>/dev/null || true)
	if [ "$(echo "$out" | grep -c .)" = "$nn" ]; then
		log "smoke job OK; PBS_NODEFILE was: $(echo $out)"
		rm -rf "$dir"
	else
		su - "$TEST_USER" -c "$PREFIX/bin/qstat -x -f $id" || true
		die "smoke job failed (output dir $dir)"
	fi
}

case "${1:-}" in
	start) setup_network; start_all; wait_nodes_free ;;
	stop) stop_all ;;
	status) /etc/init.d/pbs status || true; mom_ctl status; "$PREFIX/bin/pbsnodes" -aSj 2>/dev/null || true ;;
	""|-h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
	*)
		install_deps
		build_install "$1"
		setup_network
		ensure_user
		write_configs
		if [ "$CONF_CHANGED" = 1 ] && server_up; then
			log "/etc/pbs.conf changed; restarting PBS"
			stop_all
		fi
		start_all
		configure_server
		wait_nodes_free
		[ "$SMOKE" = 1 ] && smoke_test
		log "PBS is running. Stop: $0 stop   Start: $0 start   (users: . /etc/profile.d/pbs.sh)"
		;;
esac
