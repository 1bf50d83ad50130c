#!/usr/bin/env bash
# Refreshes the JavaScript the dashboard vendors (crates/coordinator/ui/vendor/, embedded in
# the binary; see its VENDORED.md): xterm.js and noVNC from the npm registry at the pinned
# versions below, with their licences, and only the files the dashboard loads (xterm's ES
# module and stylesheet; noVNC's core/ ES modules reachable from core/rfb.js, and the pako
# files they import). Needs npm (to fetch) and python3 (to follow noVNC's imports).
#   scripts/vendor-ui.sh            # fetch and replace the vendored files
# Change a version here, run it, look at the diff, run tests/ui.rs, commit.
set -euo pipefail
XTERM_VERSION=6.0.0
NOVNC_VERSION=1.7.0
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/crates/coordinator/ui/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "@xterm/xterm@$XTERM_VERSION" "@novnc/novnc@$NOVNC_VERSION" >/dev/null
mkdir xterm novnc
tar xzf "xterm-xterm-$XTERM_VERSION.tgz" -C xterm
tar xzf "novnc-novnc-$NOVNC_VERSION.tgz" -C novnc

rm -rf "$dest/xterm" "$dest/novnc"
mkdir -p "$dest/xterm" "$dest/novnc"
cp xterm/package/lib/xterm.mjs xterm/package/css/xterm.css xterm/package/LICENSE "$dest/xterm/"
cp novnc/package/LICENSE.txt novnc/package/AUTHORS "$dest/novnc/"
mkdir -p "$dest/novnc/docs" "$dest/novnc/vendor/pako"
cp novnc/package/docs/LICENSE.MPL-2.0 "$dest/novnc/docs/"
cp novnc/package/vendor/pako/LICENSE "$dest/novnc/vendor/pako/"
# Every module core/rfb.js imports, directly or not.
python3 - novnc/package "$dest/novnc" <<'PY'
import os, re, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
todo, seen = ["core/rfb.js"], set()
imp = re.compile(r"""(?:import|export)\s[^;]*?from\s*['"]([^'"]+)['"]|import\s*['"]([^'"]+)['"]""", re.S)
while todo:
    f = todo.pop()
    if f in seen:
        continue
    seen.add(f)
    text = open(os.path.join(src, f), encoding="utf-8").read()
    for m in imp.finditer(text):
        rel = m.group(1) or m.group(2)
        todo.append(os.path.normpath(os.path.join(os.path.dirname(f), rel)))
for f in sorted(seen):
    os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
    shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
print(f"vendor-ui: {len(seen)} noVNC modules")
PY
echo "vendor-ui: xterm $XTERM_VERSION, noVNC $NOVNC_VERSION in $dest ($(du -sh "$dest" | cut -f1))"
