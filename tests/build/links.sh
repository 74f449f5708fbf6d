#!/bin/sh
# ctest ebb_links_no_packer: the serving binary links neither the packer nor
# LAPACK/OpenBLAS (CMakeLists.txt: they live in ebb-pack only). Fails when
# `ebb` needs any BLAS/LAPACK/Fortran library, even through another library
# (ldd lists them all), or carries the packer's code (its symbols); the same
# checks must find both in ebb-pack, so a check that cannot see them fails
# too instead of passing by accident.
#   usage: links.sh EBB EBB_PACK
set -u
ebb=$1 pack=$2
heavy='lapack|blas|gfortran|quadmath|tmglib'
packer_symbols=' (pack_run|pack_options_default|LAPACKE_[a-z_]+)$'
status=0
fail() { echo "FAIL: $*"; status=1; }

libs=$(ldd "$ebb") || { echo "FAIL: ldd $ebb"; exit 1; }
found=$(printf '%s\n' "$libs" | grep -E "$heavy")
[ -z "$found" ] || fail "$ebb links LAPACK/BLAS: $(printf '%s' "$found" | awk '{print $1}' | tr '\n' ' ')"
found=$(nm "$ebb" | grep -E "$packer_symbols")
[ -z "$found" ] || fail "$ebb carries the packer: $(printf '%s' "$found" | awk '{print $NF}' | tr '\n' ' ')"

ldd "$pack" | grep -Eq 'liblapacke' || fail "the check sees no liblapacke in $pack either"
nm "$pack" | grep -Eq ' T pack_run$' || fail "the check sees no pack_run in $pack either"
[ "$status" -eq 0 ] && echo "ok: $ebb links no LAPACK/BLAS and no packer; $pack does"
exit "$status"
