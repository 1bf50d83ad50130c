#!/bin/sh
# vgrid staging for cloud-init guests (docs/volumes.md, "Staging"): a cloud-init boothook vgrid
# adds to the user-data of a VM with a staging volume (a virtio disk whose serial is
# vgrid-stage, ext4). Every boot: mounts it at /run/vgrid-stage and installs
# vgrid-stage-out.service, whose ExecStop (at shutdown, after cloud-final.service, i.e. the
# user's runcmd and scripts, has stopped) copies each `out N GUESTPATH` of the manifest to
# out/N, syncs and unmounts the disk. Once per instance: copies each `in N GUESTPATH` into
# place, before the user's bootcmd, runcmd and scripts run.
mnt=/run/vgrid-stage
say() { echo "vgrid-stage: $*" >/dev/console 2>/dev/null; echo "vgrid-stage: $*"; }
dev=/dev/disk/by-id/virtio-vgrid-stage
if [ ! -b "$dev" ]; then
  dev=
  for s in /sys/block/vd*/serial; do
    [ "$(cat "$s" 2>/dev/null)" = vgrid-stage ] || continue
    d=${s%/serial}
    dev=/dev/${d##*/}
  done
fi
if [ -z "$dev" ]; then
  say "no staging disk (serial vgrid-stage)"
  exit 0
fi
mkdir -p "$mnt"
if ! mountpoint -q "$mnt" && ! mount -t ext4 "$dev" "$mnt"; then
  say "cannot mount the staging disk $dev"
  exit 0
fi
if [ ! -f "$mnt/vgrid-stage" ]; then
  say "the staging disk $dev has no manifest vgrid-stage"
  exit 0
fi
marker="/var/lib/vgrid-stage/in.${INSTANCE_ID:-instance}"
if [ ! -e "$marker" ]; then
  while read -r kind n path; do
    [ "$kind" = in ] || continue
    if [ -d "$mnt/in/$n" ]; then
      mkdir -p "$path" && cp -a "$mnt/in/$n/." "$path/"
    else
      mkdir -p "$(dirname "$path")" && cp "$mnt/in/$n" "$path"
    fi && say "staged in $path" || say "stage-in $path failed"
  done <"$mnt/vgrid-stage"
  mkdir -p /var/lib/vgrid-stage && : >"$marker"
fi
mkdir -p /usr/local/sbin
cat >/usr/local/sbin/vgrid-stage-out <<'EOS'
#!/bin/sh
mnt=/run/vgrid-stage
say() { echo "vgrid-stage: $*" >/dev/console 2>/dev/null; echo "vgrid-stage: $*"; }
cd /
if [ -f "$mnt/vgrid-stage" ]; then
  mkdir -p "$mnt/out"
  while read -r kind n path; do
    [ "$kind" = out ] || continue
    rm -rf "$mnt/out/$n"
    if [ -d "$path" ]; then
      cp -a "$path" "$mnt/out/$n"
    elif [ -e "$path" ]; then
      cp "$path" "$mnt/out/$n"
    else
      false
    fi && say "staged out $path" || say "stage-out $path failed"
  done <"$mnt/vgrid-stage"
  sync
fi
umount "$mnt" || mount -o remount,ro "$mnt"
say "staging disk unmounted"
EOS
chmod 755 /usr/local/sbin/vgrid-stage-out
cat >/etc/systemd/system/vgrid-stage-out.service <<'EOS'
[Unit]
Description=vgrid staging: copy the stage-out paths onto the staging disk at shutdown
RequiresMountsFor=/run/vgrid-stage
Before=cloud-final.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/usr/local/sbin/vgrid-stage-out
TimeoutStopSec=600
EOS
systemctl daemon-reload
systemctl start --no-block vgrid-stage-out.service
say "staging disk mounted; stage-out at shutdown"
