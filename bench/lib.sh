# Shared helpers of vgrid's benchmarks (sourced by bench/<name>; see bench/README.md).
#
# - a work directory and a cleanup trap that undoes everything a benchmark started, also on
#   failure or Ctrl-C: processes (by the pids we recorded), the network namespace and its veth
#   pair, temporary files;
# - the emulated grid link of /work/shared/BENCHMARKS.md: the image server in its own network
#   namespace `vgbench-$$`, joined to the host by a veth pair, both ends shaped with
#   `tc qdisc add dev IF root tbf rate 100mbit burst 32kbit latency 400ms` (no netem);
# - starting `vgrid image-server` inside that namespace or on the host's loopback, and
#   `vgrid up` pointed at it;
# - medians and spreads of repeated rounds;
# - smoke mode (BENCH_SMOKE=1): each benchmark's tiny defaults, see `smoke` below.
#
# Conventions: every helper prints its progress to stderr; figures go to stdout.

set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Smoke mode (`BENCH_SMOKE=1`, or `bench/run --smoke`): tiny sizes and one round through the
# same code path (loopback and the grid link), with the debug build; the last line still comes,
# with `smoke=1` in it. Its figures mean nothing: it shows that the benchmark still works.
# `scripts/test` runs every benchmark this way.
BENCH_SMOKE=${BENCH_SMOKE:-0}
smoke() { [ "$BENCH_SMOKE" = 1 ]; }
# What the last line carries in smoke mode.
SMOKE_KV=""
smoke && SMOKE_KV=" smoke=1"
# The binary: release build (bench/run builds it); in smoke mode the debug build.
VGRID=${VGRID:-${CARGO_TARGET_DIR:-$BENCH_ROOT/target}/$(smoke && echo debug || echo release)/vgrid}
# The link of BENCHMARKS.md; override only to experiment (the committed figures use these).
GRID_RATE=${GRID_RATE:-100mbit}
GRID_BURST=${GRID_BURST:-32kbit}
GRID_LATENCY=${GRID_LATENCY:-400ms}

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${BENCH_NAME:-bench}" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# cleanup

_CLEANUP=()      # shell snippets, run in reverse order at exit
_PIDS=()         # processes we started (killed at exit if still alive)

on_exit() { _CLEANUP+=("$1"); }
track_pid() { _PIDS+=("$1"); }

# Stops one process we started: SIGTERM, up to $2 seconds (default 10), then SIGKILL.
stop_pid() {
  local pid=$1 t=${2:-10} i=0
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ $i -lt $((t * 10)) ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ignored SIGTERM for ${t}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# QEMU processes whose command line names a path under $1 (VMs a benchmark's `vgrid up`
# started in its own data directory); killed by pid, nothing else is touched.
kill_qemus_under() {
  local dir=$1 p
  [ -n "$dir" ] || return 0
  for p in $(pgrep -f "qemu-system.*$dir" 2>/dev/null || true); do
    log "killing leftover QEMU $p (under $dir)"
    kill -KILL "$p" 2>/dev/null || true
  done
}

_run_cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  set +e
  for ((i = ${#_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${_PIDS[$i]}" 5; done
  for ((i = ${#_CLEANUP[@]} - 1; i >= 0; i--)); do eval "${_CLEANUP[$i]}" >/dev/null 2>&1; done
  [ $rc -eq 0 ] || log "exit status $rc (cleaned up)"
  exit $rc
}
trap _run_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# bench_workdir NAME: a fresh work directory under $BENCH_TMP (default /var/tmp), removed at exit
# unless BENCH_KEEP=1.
bench_workdir() {
  local base=${BENCH_TMP:-/var/tmp}
  WORK=$(mktemp -d "$base/vgbench-$1.XXXXXX")
  # As root, guests' QEMU runs as vgrid-qemu, which must search its way to the runtime dirs.
  chmod 755 "$WORK"
  if [ "${BENCH_KEEP:-0}" = 1 ]; then
    log "work directory $WORK (kept: BENCH_KEEP=1)"
    on_exit "kill_qemus_under '$WORK'"
  else
    on_exit "kill_qemus_under '$WORK'; rm -rf '$WORK'"
  fi
}

# ---------------------------------------------------------------------------------------------
# the grid link

GRID_NS=""
GRID_IF_HOST=""
GRID_IF_NS=""
GRID_HOST_IP=""
GRID_NS_IP=""
GRID_OK=0

# grid_link_up: creates namespace vgbench-$$ and the veth pair, addresses them with a /30 out
# of 10.251.0.0/16 chosen from our pid (only ever used between this host and its own
# namespaces), and shapes both ends. Returns non-zero (and says why) when any step fails; the
# caller then reports loopback figures only.
grid_link_up() {
  local n=$$ a b
  a=$((n % 250 + 1))
  b=$(((n / 250) % 64 * 4))
  GRID_NS=vgbench-$$
  GRID_IF_HOST=vgb${n}h
  GRID_IF_NS=vgb${n}n
  GRID_HOST_IP=10.251.$a.$((b + 1))
  GRID_NS_IP=10.251.$a.$((b + 2))
  if ! {
    ip netns add "$GRID_NS" &&
      on_exit "ip netns pids '$GRID_NS' 2>/dev/null | xargs -r kill -KILL; ip link del '$GRID_IF_HOST'; ip netns del '$GRID_NS'" &&
      ip link add "$GRID_IF_HOST" type veth peer name "$GRID_IF_NS" &&
      ip link set "$GRID_IF_NS" netns "$GRID_NS" &&
      ip addr add "$GRID_HOST_IP/30" dev "$GRID_IF_HOST" &&
      ip link set "$GRID_IF_HOST" up &&
      ip -n "$GRID_NS" addr add "$GRID_NS_IP/30" dev "$GRID_IF_NS" &&
      ip -n "$GRID_NS" link set "$GRID_IF_NS" up &&
      ip -n "$GRID_NS" link set lo up &&
      grid_shape on
  } 2>"${WORK:-/tmp}/grid-link.err"; then
    log "cannot set up the emulated grid link: $(tr '\n' ' ' <"${WORK:-/tmp}/grid-link.err")"
    GRID_OK=0
    return 1
  fi
  GRID_OK=1
  log "grid link up: host $GRID_IF_HOST $GRID_HOST_IP <-> netns $GRID_NS $GRID_IF_NS $GRID_NS_IP, tbf rate $GRID_RATE burst $GRID_BURST latency $GRID_LATENCY both ends"
}

# grid_shape on|off: adds or removes the tbf qdisc on both ends.
grid_shape() {
  if [ "$1" = on ]; then
    tc qdisc replace dev "$GRID_IF_HOST" root tbf rate "$GRID_RATE" burst "$GRID_BURST" latency "$GRID_LATENCY" &&
      ip netns exec "$GRID_NS" tc qdisc replace dev "$GRID_IF_NS" root tbf rate "$GRID_RATE" burst "$GRID_BURST" latency "$GRID_LATENCY"
  else
    tc qdisc del dev "$GRID_IF_HOST" root 2>/dev/null || true
    ip netns exec "$GRID_NS" tc qdisc del dev "$GRID_IF_NS" root 2>/dev/null || true
  fi
}

# Bytes the host side of the link has received (image server -> host).
grid_rx_bytes() { cat "/sys/class/net/$GRID_IF_HOST/statistics/rx_bytes"; }

# ---------------------------------------------------------------------------------------------
# processes

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL [SECONDS]: until URL answers (any HTTP status).
wait_http() {
  local url=$1 t=${2:-30} i=0
  # A liveness probe only (any answer will do), so the server's certificate is not checked here.
  while ! curl -sk -o /dev/null --max-time 2 "$url"; do
    i=$((i + 1))
    [ $i -lt $((t * 10)) ] || return 1
    sleep 0.1
  done
}

# bench_ca_into DIR: puts the benchmark's CA (made once, in $BENCH_CA) into DIR as ca.crt and
# ca.key, where `vgrid up`, `vgrid coordinator` and a standalone image server look for their CA.
BENCH_CA=${BENCH_CA:-}
bench_ca_into() {
  local dir=$1
  if [ -z "$BENCH_CA" ] || [ ! -s "$BENCH_CA/ca.key" ]; then
    BENCH_CA=${WORK:-$(mktemp -d /tmp/vgrid-bench.XXXXXX)}/ca
    mkdir -p "$BENCH_CA"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj "/O=vgrid/CN=vgrid bench CA" \
      -addext basicConstraints=critical,CA:TRUE,pathlen:0 -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature \
      -keyout "$BENCH_CA/ca.key" -out "$BENCH_CA/ca.crt" 2>/dev/null || die "openssl could not make the benchmark CA"
  fi
  mkdir -p "$dir"
  [ -s "$dir/ca.key" ] || cp "$BENCH_CA/ca.crt" "$BENCH_CA/ca.key" "$dir/"
}

# wait_socket PATH [SECONDS]
wait_socket() {
  local p=$1 t=${2:-30} i=0
  while [ ! -S "$p" ]; do
    i=$((i + 1))
    [ $i -lt $((t * 10)) ] || return 1
    sleep 0.1
  done
}

IMAGE_SERVER_URL=""
IMAGE_SERVER_PID=""
IMAGE_SERVER_PORT=""

# start_image_server ns|host DATA_DIR [COORDINATOR_URL]: `vgrid image-server` inside the grid
# namespace (listening on its end of the link) or on the host's loopback (one port per
# benchmark, kept across restarts); sets IMAGE_SERVER_URL and IMAGE_SERVER_PID. With
# COORDINATOR_URL it advertises itself (and its images) to that coordinator, which resolves
# `vm run IMAGE` only on image servers that advertise to it.
# IMAGE_SERVER_EXTRA: more arguments for it (e.g. --store s3://...).
IMAGE_SERVER_EXTRA=()
start_image_server() {
  local where=$1 data=$2 coord=${3:-} addr
  mkdir -p "$data"
  if [ "$where" = ns ]; then
    addr=$GRID_NS_IP:7071
  else
    [ -n "$IMAGE_SERVER_PORT" ] || IMAGE_SERVER_PORT=$(free_port)
    addr=127.0.0.1:$IMAGE_SERVER_PORT
  fi
  local args=(image-server --listen "$addr" --data-dir "$data" "${IMAGE_SERVER_EXTRA[@]}")
  if [ -n "$coord" ]; then
    args+=(--coordinator "$coord" --advertise-url "https://$addr" --name bench-images)
    # Joins that coordinator's grid once (the certificate is kept in DATA/tls).
    [ -s "$data/tls/node.crt" ] || args+=(--join-token "$("$VGRID" --url "$coord" join-token create --role image-server 2>/dev/null)")
  else
    # Standalone: its own CA in DATA/tls/ca, shared with every `vgrid up` of this benchmark.
    bench_ca_into "$data/tls/ca"
  fi
  if [ "$where" = ns ]; then
    ip netns exec "$GRID_NS" "$VGRID" "${args[@]}" >>"$data.log" 2>&1 &
  else
    "$VGRID" "${args[@]}" >>"$data.log" 2>&1 &
  fi
  IMAGE_SERVER_PID=$!
  track_pid "$IMAGE_SERVER_PID"
  IMAGE_SERVER_URL=https://$addr
  wait_http "$IMAGE_SERVER_URL/store/v1/images" 30 || die "image server at $addr did not come up (see $data.log)"
  if [ -n "$coord" ]; then
    local i=0 token
    token=$("$VGRID" --url "$coord" --json login | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    until curl -s --cacert "$BENCH_CA/ca.crt" -H "authorization: Bearer $token" --max-time 2 "$coord/api/v1/image-servers" | grep -q "$IMAGE_SERVER_URL"; do
      i=$((i + 1))
      [ $i -lt 300 ] || die "image server $IMAGE_SERVER_URL did not register with $coord (see $data.log)"
      sleep 0.1
    done
  fi
  log "image server ($where) at $IMAGE_SERVER_URL, pid $IMAGE_SERVER_PID${coord:+, advertising to $coord}"
}

stop_image_server() {
  stop_pid "$IMAGE_SERVER_PID" 10
  IMAGE_SERVER_PID=""
}

UP_PID=""
UP_URL=""
UP_DIR=""

# start_up DATA_DIR IMAGE_SERVER_URL: `vgrid up` with a fresh data directory whose host agent
# reads images from IMAGE_SERVER_URL first; sets UP_URL, UP_PID, UP_DIR (its NBD socket is
# $UP_DIR/host/nbd.sock).
# An optional third argument is the address to listen on (default 127.0.0.1), e.g. the host's
# end of the grid link so that an image server in the namespace can advertise to it.
start_up() {
  UP_DIR=$1
  local srv=$2 ip=${3:-127.0.0.1} port
  mkdir -p "$UP_DIR"
  port=$(free_port)
  UP_URL=https://$ip:$port
  # Every `vgrid up` of a benchmark holds the same CA, so image servers stay trusted across rounds.
  bench_ca_into "$UP_DIR/tls"
  "$VGRID" up --data-dir "$UP_DIR" --listen "$ip:$port" --image-server "$srv" >"$UP_DIR.log" 2>&1 &
  UP_PID=$!
  track_pid "$UP_PID"
  wait_http "$UP_URL/api/v1/vms" 60 || die "vgrid up did not come up (see $UP_DIR.log)"
}

stop_up() {
  local t
  t=$(now)
  stop_pid "$UP_PID" 30
  log "vgrid up (pid $UP_PID) stopped in $(elapsed "$t") s"
  kill_qemus_under "$UP_DIR"
  UP_PID=""
}

# start_run_host DIR SRV_DATA: one run's fresh host: `vgrid up` in DIR (new data directory:
# empty host chunk cache) whose host agent reads images from the benchmark's image server, and
# that image server (data in SRV_DATA) restarted advertising to this `vgrid up`'s coordinator,
# as `vgrid image-server --coordinator` does on a real grid (the coordinator resolves
# `vm run IMAGE` only on image servers that advertise to it). Behind the grid link when it is
# up (`vgrid up` then listens on the host's end of the veth pair), else on loopback. Sets what
# start_up and start_image_server set.
start_run_host() {
  local dir=$1 srv=$2
  if [ "$GRID_OK" = 1 ]; then
    start_up "$dir" "$IMAGE_SERVER_URL" "$GRID_HOST_IP"
    stop_image_server
    start_image_server ns "$srv" "$UP_URL"
  else
    start_up "$dir" "$IMAGE_SERVER_URL"
    stop_image_server
    start_image_server host "$srv" "$UP_URL"
  fi
}

# cache_bytes_fetched: bytes the running `vgrid up`'s host chunk cache fetched from image
# servers (`vgrid image cache stats`: plain chunk bytes, after decompression; disk chunks and
# the kernel and initrd blobs).
cache_bytes_fetched() {
  VGRID_URL=$UP_URL "$VGRID" image cache stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_fetched"])'
}

# qemu_started_after LOG T0: seconds from T0 (a `now` value) to the "QEMU started" line of a
# `vgrid up` log ("?" when there is none).
qemu_started_after() {
  local ts
  ts=$(sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -m1 'QEMU started' | awk '{ print $1 }')
  [ -n "$ts" ] || { echo "?"; return 0; }
  awk -v a="$2" -v b="$(date -d "$ts" +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
}

# ---------------------------------------------------------------------------------------------
# numbers

now() { date +%s.%N; }
# elapsed START: seconds since START (a `now` value), 3 decimals.
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

# median V...: the median of the values.
median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "nan"; exit } if (NR % 2) printf "%.12g\n", v[(NR + 1) / 2]; else printf "%.12g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# spread V...: (max - min) / median in percent, e.g. "4.2%".
spread() {
  local m
  m=$(median "$@")
  printf '%s\n' "$@" | sort -g | awk -v m="$m" '{ v[NR] = $1 } END { if (NR == 0 || m == 0) { print "nan"; exit } printf "%.1f%%\n", 100 * (v[NR] - v[1]) / m }'
}

# minmax V...: "min..max"
minmax() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%s..%s\n", v[1], v[NR] }'; }

# ratio A B [DIGITS]: A / B
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { if (b == 0) print "nan"; else printf "%.*f\n", d, a / b }'; }

# fmt V [DIGITS]
fmt() { awk -v a="$1" -v d="${2:-1}" 'BEGIN { printf "%.*f\n", d, a }'; }

# to_bytes 64K|256K|1M|...: bytes
to_bytes() {
  local s=${1^^}
  case "$s" in
    *K) echo $((${s%K} * 1024)) ;;
    *M) echo $((${s%M} * 1024 * 1024)) ;;
    *G) echo $((${s%G} * 1024 * 1024 * 1024)) ;;
    *) echo "$s" ;;
  esac
}
