#!/usr/bin/env bash
# Builds vgrid's sample/test guest from Debian packages only, and caches it.
#
#   scripts/build-sample-guest.sh [OUTDIR]
#
# OUTDIR defaults to ${VGRID_CACHE:-$HOME/.cache/vgrid}/sample-guest-v$LAYOUT (LAYOUT below: bump it
# when the guest's contents change, so checkouts of different versions on one machine do not
# rebuild each other's cache). The build is keyed on a hash of this script: an OUTDIR built by the
# same script is reused as is (so CI and every test can call this script cheaply); edit the
# script and the next call rebuilds. Concurrent callers
# are serialised with a lock file next to OUTDIR. The last line on stdout is OUTDIR.
#
# Outputs in OUTDIR:
#   vmlinuz     Debian's cloud kernel (linux-image-*-cloud-amd64)
#   initrd.img  busybox initramfs (gzip newc cpio) whose /init is described below
#   disk.img    64 MiB raw ext4 disk holding /etc/vgrid-sample = "vgrid-sample-disk-ok"
#   cmdline     recommended kernel command line. Appending init_on_free=1 (the kernel zeroes
#               pages it frees) makes freed memory travel as zero pages in a saved state (~57 MB
#               instead of ~96 MB at the prompt; bench/warmstart does so), but the guest then
#               touches all memory it ever frees, so it is not the default: a guest's host
#               memory would grow to its whole RAM and fill memory limits sooner
#   kernel-version, stamp
#
# The guest's /init: mounts proc/sys/dev, loads the virtio modules, mounts /dev/vda (ext4) at
# /mnt, prints "vgrid-sample: booted" and "vgrid-sample: disk says <content of
# /mnt/etc/vgrid-sample>", runs /mnt/rc if present, then per the kernel command line:
#   vgrid.mode=shell     (default) an interactive busybox shell on the console (prompt "vgrid# "),
#                        respawned when it exits;
#   vgrid.mode=poweroff  sync, unmount and power off.
#   vgrid.net=dhcp       bring up eth0 (virtio-net) with udhcpc before the marker and print
#                        "vgrid-sample: net up <addr>" (or "vgrid-sample: net failed").
# An ACPI power button press (QMP system_powerdown) makes the guest kill its processes, sync,
# unmount /mnt and power off ("vgrid-sample: power button" on the console).
# `vgrid-poweroff` in the guest's shell does the same.
#
# Staging (`vgrid vm run --stage-in/--stage-out`, docs/volumes.md): a virtio disk whose serial is
# `vgrid-stage` (ext4) is mounted at /stage before the boot marker; each `in N GUESTPATH` line of
# its manifest /stage/vgrid-stage copies /stage/in/N to GUESTPATH (a directory's contents into
# GUESTPATH, created). At power-off (vgrid-poweroff, the power button, vgrid.mode=poweroff) each
# `out N GUESTPATH` copies GUESTPATH to /stage/out/N, then /stage is synced and unmounted.
#
# Boot with: qemu-system-x86_64 -machine pc -accel tcg -m 256 -nographic \
#   -kernel vmlinuz -initrd initrd.img -append "$(cat cmdline)" \
#   -drive file=disk.img,format=raw,if=virtio
set -euo pipefail

log() { echo "build-sample-guest: $*" >&2; }

script_path=$(readlink -f "$0")
# v2: init_on_free=1 in cmdline. v3: without it again (guests near their memory limit were
# OOM-killed while booting). v4: staging (a disk with serial vgrid-stage).
LAYOUT=4
out=${1:-${VGRID_CACHE:-$HOME/.cache/vgrid}/sample-guest-v$LAYOUT}
out=$(realpath -m "$out")
# shellcheck source=guest-cache.sh
. "$(dirname "$script_path")/guest-cache.sh"
guest_cache_enter "$script_path"

for tool in apt-get apt-cache dpkg mke2fs gzip flock; do
  command -v "$tool" >/dev/null || { log "missing $tool (run scripts/install-deps.sh)"; exit 1; }
done

work=$(mktemp -d "$(dirname "$out")/.sample-guest-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt-get download drops privileges to _apt when it can

# --- fetch the packages --------------------------------------------------------------------
kernel_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -1
}
apt_update() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
}
pkg=$(kernel_pkg || true)
if [ -z "$pkg" ]; then
  log "apt lists do not know linux-image-cloud-amd64; running apt-get update"
  apt_update
  pkg=$(kernel_pkg || true)
fi
[ -n "$pkg" ] || { log "could not find a linux-image-*-cloud-amd64 package with apt-cache"; exit 1; }
log "kernel package: $pkg"

if ! (cd "$work" && apt-get download -q "$pkg" busybox-static >&2); then
  # Stale lists name a kernel the mirror no longer has (security updates bump the ABI).
  log "download failed; running apt-get update and retrying once"
  apt_update
  pkg=$(kernel_pkg || true)
  [ -n "$pkg" ] || { log "could not find a linux-image-*-cloud-amd64 package with apt-cache"; exit 1; }
  rm -f "$work"/*.deb
  (cd "$work" && apt-get download -q "$pkg" busybox-static >&2)
fi
mkdir "$work/kpkg" "$work/bbpkg"
dpkg -x "$work"/linux-image-*.deb "$work/kpkg"
dpkg -x "$work"/busybox-static_*.deb "$work/bbpkg"
kver=$(ls "$work/kpkg/lib/modules" | head -1)
[ -n "$kver" ] || { log "no modules directory in $pkg"; exit 1; }
config="$work/kpkg/boot/config-$kver"
busybox="$work/bbpkg/bin/busybox"
[ -x "$busybox" ] || { log "no busybox binary in busybox-static"; exit 1; }

# --- initramfs ---------------------------------------------------------------------------
root="$work/initramfs"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,tmp,etc,lib/modules,root,stage}
cp "$busybox" "$root/bin/busybox"

# Modules in load order. A module whose CONFIG_ symbol is built in (=y) is skipped.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
failover net_failover virtio_net crc16 mbcache jbd2 libcrc32c crc32c_generic ext4 evdev button"
: >"$root/etc/modules"
for m in $modules; do
  f=$(find "$work/kpkg/lib/modules/$kver/kernel" -name "$m.ko" -o -name "$m.ko.xz" \
        -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -1)
  if [ -z "$f" ]; then
    if grep -Eq "(^|/)$m\.ko$" "$work/kpkg/lib/modules/$kver/modules.builtin" 2>/dev/null; then
      continue # built into the kernel
    fi
    log "module $m not found in $pkg and not built in"
    exit 1
  fi
  case "$f" in
    *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
  esac
  echo "$m" >>"$root/etc/modules"
done
grep -q '^CONFIG_EXT4_FS=[ym]' "$config" || { log "kernel $kver has no ext4"; exit 1; }

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
cmdline=$(cat /proc/cmdline)
# The last occurrence of a parameter wins (so callers can append to the recommended cmdline).
param() { v=$2; for w in $cmdline; do case "$w" in "$1="*) v=${w#*=};; esac; done; echo "$v"; }
mode=$(param vgrid.mode shell)
net=$(param vgrid.net none)

for m in $(cat /etc/modules); do
  insmod /lib/modules/$m.ko || echo "vgrid-sample: insmod $m failed"
done

# Power off cleanly: stop everything else, flush and unmount the disk, then ACPI power off.
cat >/bin/vgrid-poweroff <<'EOS'
#!/bin/sh
kill -TERM -1 2>/dev/null; sleep 0.2; kill -KILL -1 2>/dev/null
cd /
if [ -f /stage/vgrid-stage ]; then
  mkdir -p /stage/out
  while read -r kind n path; do
    [ "$kind" = out ] || continue
    rm -rf "/stage/out/$n"
    if [ -d "$path" ]; then
      cp -a "$path" "/stage/out/$n"
    elif [ -e "$path" ]; then
      cp "$path" "/stage/out/$n"
    else
      false
    fi && echo "vgrid-sample: staged out $path" || echo "vgrid-sample: stage-out $path failed"
  done </stage/vgrid-stage
  sync
  umount /stage || mount -o remount,ro /stage
fi
sync
umount /mnt 2>/dev/null || mount -o remount,ro /mnt 2>/dev/null || umount -l /mnt
sync
echo "vgrid-sample: powering off"
poweroff -f
EOS
chmod 755 /bin/vgrid-poweroff

# ACPI power button (QMP system_powerdown): the button driver reports it as a key on an evdev
# input device named "Power Button"; reading one event from it is the signal.
for ev in /sys/class/input/event*; do
  [ -e "$ev/device/name" ] || continue
  case "$(cat "$ev/device/name")" in
    "Power Button")
      ( dd if=/dev/input/${ev##*/} of=/dev/null bs=24 count=1 2>/dev/null \
          && echo "vgrid-sample: power button" && exec /bin/vgrid-poweroff ) &
      ;;
  esac
done

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda /mnt; then
  disk=ok
else
  echo "vgrid-sample: cannot mount /dev/vda"
  disk=none
fi

# Staging: the disk whose serial is vgrid-stage.
for s in /sys/block/vd*/serial; do
  [ "$(cat "$s" 2>/dev/null)" = vgrid-stage ] || continue
  d=${s%/serial}
  if mount -t ext4 "/dev/${d##*/}" /stage && [ -f /stage/vgrid-stage ]; then
    while read -r kind n path; do
      [ "$kind" = in ] || continue
      if [ -d "/stage/in/$n" ]; then
        mkdir -p "$path" && cp -a "/stage/in/$n/." "$path/"
      else
        mkdir -p "$(dirname "$path")" && cp "/stage/in/$n" "$path"
      fi && echo "vgrid-sample: staged in $path" || echo "vgrid-sample: stage-in $path failed"
    done </stage/vgrid-stage
  else
    echo "vgrid-sample: cannot mount the staging disk /dev/${d##*/}"
  fi
done

if [ "$net" = dhcp ]; then
  cat >/bin/udhcpc.script <<'EOS'
#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    echo "$ip" >/tmp/net-addr
    ;;
esac
EOS
  chmod 755 /bin/udhcpc.script
  ip link set lo up
  if ip link set eth0 up 2>/dev/null && udhcpc -i eth0 -q -n -t 10 -T 1 -s /bin/udhcpc.script >/dev/null 2>&1; then
    echo "vgrid-sample: net up $(cat /tmp/net-addr)"
  else
    echo "vgrid-sample: net failed"
  fi
fi

echo "vgrid-sample: booted"
if [ "$disk" = ok ]; then
  echo "vgrid-sample: disk says $(cat /mnt/etc/vgrid-sample 2>&1)"
  [ -f /mnt/rc ] && sh /mnt/rc
fi

if [ "$mode" = poweroff ]; then
  exec /bin/vgrid-poweroff
fi
export PS1='vgrid# '
while :; do
  cd /
  setsid cttyhack sh
  sleep 0.1
done
EOF
chmod 755 "$root/init"

(cd "$root" && find . | sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >"$work/initrd.img"

# --- disk --------------------------------------------------------------------------------
disk_root="$work/diskroot"
mkdir -p "$disk_root/etc"
echo "vgrid-sample-disk-ok" >"$disk_root/etc/vgrid-sample"
mke2fs -q -t ext4 -L vgrid-sample -d "$disk_root" "$work/disk.img" 64M >&2

cp "$work/kpkg/boot/vmlinuz-$kver" "$work/vmlinuz"
echo "console=ttyS0 panic=-1 tsc_early_khz=2500000 quiet vgrid.mode=shell" >"$work/cmdline"
echo "$kver" >"$work/kernel-version"
echo "$stamp" >"$work/stamp"

# --- publish -----------------------------------------------------------------------------
rm -rf "$out"
mkdir -p "$out"
for f in vmlinuz initrd.img disk.img cmdline kernel-version; do
  mv "$work/$f" "$out/$f"
done
mv "$work/stamp" "$out/stamp" # last: marks the directory complete
log "built $out (kernel $kver)"
echo "$out"
