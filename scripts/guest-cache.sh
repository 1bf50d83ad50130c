# The cache protocol of the test guests' build scripts (scripts/build-*-guest.sh source it).
# A guest is built into a directory `$out` that is complete once its `stamp` file matches the
# stamp of the script that built it (and of this file); concurrent builds of one guest take
# turns on `$out.lock`.
#
# guest_cache_enter SCRIPT: sets `stamp`; prints `$out` and exits when the guest is built
# already (also when another process finished it while this one waited for the lock); else
# returns holding the lock (file descriptor 9) for the caller to build it.

guest_is_built() {
  [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] &&
    [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -s "$out/disk.img" ] && [ -s "$out/cmdline" ]
}

guest_cache_enter() {
  stamp=$(cat "$1" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-32)
  if guest_is_built; then
    echo "$out"
    exit 0
  fi
  mkdir -p "$(dirname "$out")"
  exec 9>"$out.lock"
  flock 9
  if guest_is_built; then # somebody else built it while we waited for the lock
    echo "$out"
    exit 0
  fi
}
