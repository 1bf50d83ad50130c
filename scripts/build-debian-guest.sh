#!/usr/bin/env bash
# Builds a stock Debian 12 (bookworm) guest with debootstrap, and caches it: a real
# distribution with systemd, for tests the busybox sample guest cannot stand in for (issue 13:
# an image server outage during a systemd boot on ext4).
#
#   scripts/build-debian-guest.sh [--cloud] [OUTDIR]
#   scripts/build-debian-guest.sh [--cloud] --dir [OUTDIR]   # only print OUTDIR (built or not)
#
# OUTDIR defaults to ${VGRID_CACHE:-$HOME/.cache/vgrid}/debian-guest-v$LAYOUT, or
# debian-cloud-guest-v$LAYOUT with --cloud (bump LAYOUT below when the guest's contents change).
#
# --cloud builds a stock cloud image instead, as Debian's genericcloud images are: the same
# system plus cloud-init (NoCloud and ConfigDrive data sources only), no automatic login, no
# ssh host keys baked in (cloud-init makes them per instance), root locked. It learns its
# hostname, ssh keys and user-data from a NoCloud seed (`vgrid vm run --ssh-key`); the
# readiness marker is printed once cloud-init's final stage is done. Like scripts/build-sample-guest.sh the build is keyed on a
# hash of this script (an OUTDIR built by the same script is reused as is, so tests can call it
# cheaply), concurrent callers are serialised with a lock file next to OUTDIR, and the last line
# on stdout is OUTDIR. Needs root (debootstrap, chroot; as another user it runs those through
# sudo), debootstrap and e2fsprogs (scripts/install-deps.sh) and a Debian mirror
# ($VGRID_DEBIAN_MIRROR, default http://deb.debian.org/debian). About 5 minutes here.
#
# The guest: debootstrap --variant=minbase plus systemd (init), udev, dbus (logind: the ACPI
# power button powers it off, so `vgrid vm stop` is clean), kmod, openssh-server, iproute2,
# systemd-networkd (DHCP on eth0) and Debian's cloud kernel (linux-image-cloud-amd64); apt
# caches, lists, docs, man pages and locales removed.
#   - root logs in automatically on the serial console (ttyS0), so a test can type commands;
#   - units and devices may take 600 s to start instead of 90 (slow lazy boots under TCG);
#     root has no password (ssh refuses empty passwords: add a key to /root/.ssh to log in);
#   - vgrid-ready.service, ordered after multi-user.target, prints "vgrid-debian: booted" on
#     ttyS0 when the boot is complete (`vgrid vm run debian --wait-for "vgrid-debian: booted"`);
#   - / is /dev/vda (ext4, label vgrid-debian, errors=remount-ro), mounted read-only by the
#     kernel and checked by systemd-fsck before it is remounted read-write, as Debian does;
#   - /etc/machine-id is empty (each boot makes its own); the ssh host keys are baked into the
#     image, so every VM of it shares them: fine for a test guest, not for anything else.
#
# Outputs in OUTDIR:
#   vmlinuz      the cloud kernel
#   initrd.img   its initramfs (initramfs-tools, MODULES=list: virtio, ext4)
#   disk.img     2 GiB sparse raw ext4 root file system
#   cmdline      the kernel command line (console=ttyS0 root=/dev/vda ro tsc_early_khz=2500000 ...)
#   kernel-version, packages (dpkg -l of the guest), boot-seconds (the check boot below), stamp
#
# Before publishing, the script boots the result once (QEMU, TCG, -machine pc, -snapshot: the
# disk stays pristine) and fails unless the marker shows within 900 s (a busy machine is slow).
#
# Boot with: qemu-system-x86_64 -machine pc -accel tcg -m 512 -nographic \
#   -kernel vmlinuz -initrd initrd.img -append "$(cat cmdline)" \
#   -drive file=disk.img,format=raw,if=virtio
# Import into vgrid (what tests do):
#   vgrid image import disk.img --name debian --kernel vmlinuz --initrd initrd.img \
#     --cmdline "$(cat cmdline)" [--public]
set -euo pipefail

log() { echo "build-debian-guest: $*" >&2; }

script_path=$(readlink -f "$0")
LAYOUT=1
SUITE=bookworm
MIRROR=${VGRID_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DISK_SIZE=2G
MARKER="vgrid-debian: booted"
only_dir=""
cloud=""
if [ "${1:-}" = --cloud ]; then cloud=yes; shift; fi
if [ "${1:-}" = --dir ]; then only_dir=yes; shift; fi
out=${1:-${VGRID_CACHE:-$HOME/.cache/vgrid}/debian${cloud:+-cloud}-guest-v$LAYOUT}
out=$(realpath -m "$out")
if [ -n "$only_dir" ]; then
  echo "$out"
  exit 0
fi
# shellcheck source=guest-cache.sh
. "$(dirname "$script_path")/guest-cache.sh"
guest_cache_enter "$script_path"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
for tool in debootstrap mke2fs e2fsck chroot flock qemu-system-x86_64 timeout; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] ||
    { log "missing $tool (run scripts/install-deps.sh)"; exit 1; }
done
PATH=$PATH:/usr/sbin:/sbin

t_start=$(date +%s)
work=$(mktemp -d "$(dirname "$out")/.debian-guest-build.XXXXXX")
root="$work/root"
# Never leave proc/sys mounted in the tree, and never let rm cross into a mount.
cleanup() {
  for m in "$root/sys" "$root/proc"; do
    if mountpoint -q "$m" 2>/dev/null; then $SUDO umount -l "$m" || true; fi
  done
  if grep -q " $work/" /proc/mounts; then
    log "something is still mounted under $work; leaving it"
    return
  fi
  $SUDO rm -rf --one-file-system "$work"
}
trap cleanup EXIT
chmod 755 "$work"

# --- debootstrap -------------------------------------------------------------------------
log "debootstrap $SUITE (minbase) from $MIRROR into $root"
$SUDO debootstrap --variant=minbase --include=systemd-sysv "$SUITE" "$root" "$MIRROR" >&2

in_root() { $SUDO chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
put() { # put PATH-IN-ROOT (content on stdin)
  $SUDO mkdir -p "$(dirname "$root$1")"
  $SUDO tee "$root$1" >/dev/null
}

# No docs, man pages or locales from here on; no daemon starts inside the chroot.
put /etc/dpkg/dpkg.cfg.d/01-vgrid-small <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOF
put /usr/sbin/policy-rc.d <<'EOF'
#!/bin/sh
exit 101
EOF
$SUDO chmod 755 "$root/usr/sbin/policy-rc.d"
# A small initramfs with what this machine's disk needs (virtio-blk, ext4), not every driver.
put /etc/initramfs-tools/conf.d/vgrid <<'EOF'
MODULES=list
COMPRESS=zstd
EOF
put /etc/initramfs-tools/modules <<'EOF'
virtio_pci
virtio_blk
virtio_net
crc32c_generic
ext4
EOF

$SUDO mount -t proc proc "$root/proc"
$SUDO mount -t sysfs sysfs "$root/sys"
put /etc/apt/sources.list <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
log "installing the kernel, udev, dbus, openssh-server"
in_root apt-get update -qq >&2
in_root apt-get install -y -qq --no-install-recommends \
  linux-image-cloud-amd64 udev dbus kmod openssh-server iproute2 zstd >&2
if [ -n "$cloud" ]; then
  log "installing cloud-init"
  # Only the data sources vgrid gives (probing for every cloud's metadata service takes
  # minutes under TCG); written before the package so that its configuration keeps the list.
  echo "datasource_list: [ NoCloud, ConfigDrive, None ]" | put /etc/cloud/cloud.cfg.d/90_dpkg.cfg
  in_root apt-get install -y -qq --no-install-recommends cloud-init sudo >&2
fi
kver=$(ls "$root/lib/modules" | head -1)
[ -n "$kver" ] && [ -f "$root/boot/vmlinuz-$kver" ] && [ -f "$root/boot/initrd.img-$kver" ] ||
  { log "no kernel or initrd in $root/boot"; exit 1; }

# --- configuration -----------------------------------------------------------------------
echo vgrid-debian | put /etc/hostname
put /etc/hosts <<'EOF'
127.0.0.1 localhost
127.0.1.1 vgrid-debian
::1 localhost ip6-localhost ip6-loopback
EOF
echo "LABEL=vgrid-debian / ext4 defaults,errors=remount-ro 0 1" | put /etc/fstab
: | put /etc/machine-id
if [ -n "$cloud" ]; then
  # As a stock cloud image: root locked, keys come from the seed, host keys are made on the
  # instance's first boot (by cloud-init's ssh module).
  in_root passwd -l root >/dev/null
  $SUDO rm -f "$root"/etc/ssh/ssh_host_*
else
  in_root passwd -d root >/dev/null
  put /etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
EOF
fi
# Under TCG on a busy machine a lazy boot can be slow: no unit or device (ttyS0's, which the
# serial getty waits for) fails for taking more than systemd's default 90 s.
put /etc/systemd/system.conf.d/vgrid-timeouts.conf <<'EOF'
[Manager]
DefaultTimeoutStartSec=600s
DefaultDeviceTimeoutSec=600s
EOF
put /etc/systemd/system/dev-ttyS0.device.d/timeout.conf <<'EOF'
[Unit]
JobRunningTimeoutSec=600s
EOF
put /etc/systemd/system/vgrid-ready.service <<EOF
[Unit]
Description=Tell the serial console that the boot is complete (vgrid tests wait for it)
After=multi-user.target${cloud:+ cloud-final.service}

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "$MARKER" >/dev/ttyS0'

[Install]
WantedBy=multi-user.target
EOF
put /etc/systemd/network/20-eth.network <<'EOF'
[Match]
Name=eth* en*

[Network]
DHCP=yes
EOF
in_root systemctl enable vgrid-ready.service systemd-networkd.service >&2
# An empty machine-id means "first boot": do not let systemd-firstboot ask questions on ttyS0.
# e2scrub_reap cleans up after e2scrub's LVM snapshots: there is no LVM here (10 s under TCG).
in_root systemctl mask systemd-firstboot.service e2scrub_reap.service >&2

# --- clean up ------------------------------------------------------------------------------
in_root dpkg -l >"$work/packages"
in_root apt-get clean
$SUDO rm -f "$root/usr/sbin/policy-rc.d"
$SUDO umount "$root/sys" "$root/proc"
$SUDO rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/debconf/*-old \
  "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/* \
  "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
$SUDO find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
$SUDO find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true

# --- the disk ------------------------------------------------------------------------------
log "making the ext4 root file system ($DISK_SIZE, sparse)"
$SUDO cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
$SUDO cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
$SUDO mke2fs -q -t ext4 -L vgrid-debian -d "$root" "$work/disk.img" "$DISK_SIZE" >&2
$SUDO e2fsck -fn "$work/disk.img" >&2
$SUDO chown "$(id -u):$(id -g)" "$work/vmlinuz" "$work/initrd.img" "$work/disk.img"
echo "console=ttyS0 root=/dev/vda ro panic=-1 tsc_early_khz=2500000 net.ifnames=0 quiet" >"$work/cmdline"
echo "$kver" >"$work/kernel-version"

# --- a check boot ----------------------------------------------------------------------------
log "check boot (TCG, -snapshot) until \"$MARKER\""
: >"$work/boot.log"
t_boot=$(date +%s.%N)
timeout 900 qemu-system-x86_64 -machine pc -accel tcg -m 512 -nodefaults -display none \
  -serial stdio -monitor none -snapshot -no-reboot \
  -kernel "$work/vmlinuz" -initrd "$work/initrd.img" -append "$(cat "$work/cmdline")" \
  -drive "file=$work/disk.img,format=raw,if=virtio" </dev/null >"$work/boot.log" 2>&1 &
qemu=$!
booted=""
while kill -0 "$qemu" 2>/dev/null; do
  if grep -qF "$MARKER" "$work/boot.log"; then booted=yes; break; fi
  sleep 0.2
done
t_booted=$(date +%s.%N)
kill "$qemu" 2>/dev/null || true
wait "$qemu" 2>/dev/null || true
if [ -z "$booted" ]; then
  log "the guest did not print \"$MARKER\"; its console:"
  tail -40 "$work/boot.log" >&2
  exit 1
fi
# A cloud image booted without a seed (as here) has no ssh host keys yet: cloud-init makes them
# at an instance's first boot. Its sshd cannot start then, which is no fault of the image.
errors=$(grep -E "I/O error|EXT4-fs error|Failed to start" "$work/boot.log" |
  if [ -n "$cloud" ]; then grep -v "OpenBSD Secure Shell server"; else cat; fi || true)
if [ -n "$errors" ]; then
  echo "$errors" >&2
  log "the check boot shows errors (above)"
  exit 1
fi
awk -v a="$t_boot" -v b="$t_booted" 'BEGIN { printf "%.1f\n", b - a }' >"$work/boot-seconds"
echo "$stamp" >"$work/stamp"

# --- publish -----------------------------------------------------------------------------
rm -rf "$out"
mkdir -p "$out"
for f in vmlinuz initrd.img disk.img cmdline kernel-version packages boot-seconds; do
  mv "$work/$f" "$out/$f"
done
mv "$work/stamp" "$out/stamp" # last: marks the directory complete
log "built $out in $(($(date +%s) - t_start)) s (kernel $kver; disk $(du -h "$out/disk.img" | cut -f1) used of $DISK_SIZE; check boot $(cat "$out/boot-seconds") s)"
echo "$out"
