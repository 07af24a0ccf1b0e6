#!/usr/bin/env bash
# A private Docker engine for the `docker` sandbox backend and its tests (idempotent; root only).
#   1. installs Debian's docker.io if dockerd is missing,
#   2. starts dockerd on its own socket, data and exec roots (no bridge, no iptables: the sandbox only
#      uses --network none), unless it already answers,
#   3. builds the sandbox image locally (no registry needed): the host's /usr/bin/python3, its stdlib
#      and the shared libraries they link, put together with `docker import`.
# The backend (sandboxes/docker_sandbox.py) finds this socket and image by default; a user with their
# own engine sets CISPO_DOCKER_HOST / CISPO_DOCKER_IMAGE instead (or pulls python:3.11-slim).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "note: launch/docker_engine.sh needs root (apt, dockerd); Docker sandbox tests will skip" >&2
  exit 0
fi
state=${CISPO_DOCKER_STATE:-/run/cispo-docker}
sock=$state/docker.sock
data=${CISPO_DOCKER_DATA:-/var/lib/cispo-docker}
image=cispo-python:latest
recipe=1  # bump when the image's contents change, so existing engines rebuild it
# The code sandbox's packages (launch/sandbox-requirements.txt, installed by setup_env.sh into
# .venv-sandbox) go into the image's /usr/local/lib/python3.X/dist-packages, on its python3's path.
repo=$(cd "$(dirname "$0")/.." && pwd)
site=$(ls -d "$repo"/.venv-sandbox/lib/python3*/site-packages 2>/dev/null | head -n 1 || true)
if [ -n "$site" ] && [ -f "$repo/.venv-sandbox/.cispo-installed" ]; then
  recipe="2-$(sha256sum "$repo/launch/sandbox-requirements.txt" | cut -c1-12)"
else
  site=""
  echo "note: $repo/.venv-sandbox is missing (bash launch/setup_env.sh builds it): the image gets no numpy" >&2
fi
t0=$SECONDS

if ! command -v dockerd >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  # Keep the package's own init script from starting a second, default engine.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt-get install -y -qq --no-install-recommends docker.io >/dev/null
  [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  echo "docker_engine: installed docker.io ($((SECONDS - t0)) s)"
fi
# The package's client matches its daemon; another `docker` earlier in PATH may not.
docker=/usr/bin/docker
[ -x "$docker" ] || docker=$(command -v docker)
dk() { "$docker" -H "unix://$sock" "$@"; }

if ! dk version >/dev/null 2>&1; then
  mkdir -p "$state" "$data"
  if [ -f "$state/dockerd.pid" ] && ! kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null; then
    rm -f "$state/dockerd.pid"
  fi
  echo '{}' >"$state/daemon.json"  # ignore /etc/docker/daemon.json: this engine is private
  # The daemon outlives this script: close every inherited fd above stderr first, or it would hold
  # whatever the caller had open for good (a `flock LOCK bash launch/docker_engine.sh` lock, say).
  (
    for fd in $(ls "/proc/$BASHPID/fd"); do
      [ "$fd" -le 2 ] || eval "exec $fd>&-" 2>/dev/null || true
    done
    exec setsid nohup dockerd --config-file "$state/daemon.json" --data-root "$data" \
      --exec-root "$state/exec" -p "$state/dockerd.pid" -H "unix://$sock" --bridge=none \
      --iptables=false --ip6tables=false >"$state/dockerd.log" 2>&1 </dev/null
  ) &
  for _ in $(seq 120); do
    dk version >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! dk version >/dev/null 2>&1; then
    echo "docker_engine: dockerd did not answer on $sock within 60 s; its log:" >&2
    tail -n 30 "$state/dockerd.log" >&2
    exit 1
  fi
  echo "docker_engine: dockerd answers on unix://$sock ($((SECONDS - t0)) s)"
fi

have=$(dk image inspect -f '{{index .Config.Labels "cispo.recipe"}}' "$image" 2>/dev/null || true)
if [ "$have" != "$recipe" ]; then
  py=$(readlink -f /usr/bin/python3)
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  stdlib=/usr/lib/python$ver
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/usr/bin" "$root/usr/lib" "$root/work" "$root/tmp" "$root/etc"
  cp -a "$py" "$root/usr/bin/python$ver"
  ln -s "python$ver" "$root/usr/bin/python3"
  # The stdlib without its tests and the static-library build config (25 MB nobody imports).
  tar -C /usr/lib --exclude="python$ver/test" --exclude="python$ver/config-*" \
    --exclude="python$ver/site-packages" --exclude="python$ver/dist-packages" -c "python$ver" |
    tar -C "$root/usr/lib" -x
  rm -f "$root$stdlib/sitecustomize.py"  # Debian's points into /etc, absent here
  if [ -n "$site" ]; then
    mkdir -p "$root/usr/local/lib/python$ver/dist-packages"
    cp -a "$site/." "$root/usr/local/lib/python$ver/dist-packages/"
  fi
  { ldd "$py"; find "$stdlib/lib-dynload" ${site:+"$site"} -name '*.so*' -exec ldd {} \; ; } 2>/dev/null |
    grep -o '/[^ ]*\.so[^ ]*' | grep -vF "$repo/" | sort -u | while read -r lib; do
      cp -L --parents "$lib" "$root"
    done
  chmod 1777 "$root/tmp"
  tar -C "$root" --numeric-owner --owner=0 --group=0 -c . |
    dk import --change "LABEL cispo.recipe=$recipe" --change "LABEL cispo.python=$ver" - "$image" >/dev/null
  echo "docker_engine: built $image from $py ($(dk image inspect -f '{{.Size}}' "$image") bytes," \
    "$((SECONDS - t0)) s)"
fi
echo "docker_engine: ready: unix://$sock, image $image ($((SECONDS - t0)) s)"
