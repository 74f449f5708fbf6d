#!/bin/sh
# ctest ebb_pack_runs_ebb_pack: `ebb pack` runs the ebb-pack beside ebb's
# real path with the same arguments and exit status (server/main.c), through
# a symbolic link too, and says clearly what is missing when ebb stands alone.
#   usage: pack_exec.sh EBB
set -u
ebb=$1
status=0
fail() { echo "FAIL: $*"; status=1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ebb-pack-exec.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT

out=$("$ebb" pack --help 2>&1); rc=$?
[ "$rc" -eq 0 ] && printf '%s' "$out" | grep -q '^usage: ebb pack' || fail "ebb pack --help: status $rc: $out"
# Bad usage is the packer's status 2, passed through.
out=$("$ebb" pack --format w2 2>&1); rc=$?
[ "$rc" -eq 2 ] && printf '%s' "$out" | grep -q "w2" || fail "ebb pack --format w2: status $rc (want 2): $out"
# A link elsewhere still finds ebb-pack beside the real binary.
ln -s "$(cd "$(dirname "$ebb")" && pwd)/$(basename "$ebb")" "$tmp/linked"
out=$("$tmp/linked" pack --help 2>&1); rc=$?
[ "$rc" -eq 0 ] || fail "ebb pack through a symbolic link: status $rc: $out"
# A copy with no ebb-pack beside it: 127 and the missing path named.
mkdir "$tmp/alone" && cp "$ebb" "$tmp/alone/ebb"
out=$("$tmp/alone/ebb" pack --help 2>&1); rc=$?
[ "$rc" -eq 127 ] && printf '%s' "$out" | grep -q "$tmp/alone/ebb-pack: No such file" \
  || fail "ebb pack without ebb-pack: status $rc (want 127): $out"
[ "$status" -eq 0 ] && echo "ok: ebb pack runs ebb-pack beside $ebb, and names it when missing"
exit "$status"
