#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environments. Idempotent; safe to call before every run.
#   .venv      Python 3.12, the engine and its dev tools (jax 0.11.2 pinned, as on the GPU image).
#   .venv-ref  Python 3.11 with torch 2.13 (CPU) and transformers 5.17: only for the HF reference
#              fixtures (scripts/test.sh builds it when the fixtures must be regenerated).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # $1 = minor version, e.g. 3.12
  local v="$1" p
  for p in "python$v" "$(pyenv root 2>/dev/null)/versions/$v"*/bin/python"$v" /root/.pyenv/versions/"$v"*/bin/python"$v"; do
    if "$p" -c 'import sys' >/dev/null 2>&1; then echo "$p"; return 0; fi
  done
  echo "no Python $v found (looked on PATH and under pyenv)" >&2; return 1
}

pip_quiet() {  # $1 venv, rest: pip install arguments. pip's output goes to $1/pip.log, shown on failure
  local venv="$1"; shift
  if ! "$venv/bin/python" -m pip install -q "$@" >>"$venv/pip.log" 2>&1; then
    tail -n 40 "$venv/pip.log" >&2
    echo "[bootstrap] pip install $* failed (full log: $venv/pip.log)" >&2
    return 1
  fi
}

stamp_ok() {  # $1 venv, $2 content that defines it
  [ -f "$1/.stamp" ] && [ "$(cat "$1/.stamp")" = "$2" ]
}

# Rebuild only when the dependency pins change (the package itself is installed editable).
want_main="$(sed -n '/^dependencies = \[/,/^\[project.scripts\]/p' pyproject.toml)"
if ! stamp_ok .venv "$want_main"; then
  py="$(find_python 3.12)"
  echo "[bootstrap] creating .venv with $py" >&2
  rm -rf .venv
  "$py" -m venv .venv
  pip_quiet .venv --upgrade pip
  pip_quiet .venv -e '.[dev]'
  .venv/bin/python -c 'import jax, flax, orbax.checkpoint, safetensors, tokenizers, grpc, pytest, hypothesis' \
    || { echo "[bootstrap] .venv is incomplete" >&2; exit 1; }
  printf '%s' "$want_main" > .venv/.stamp
fi

if [ "${1:-}" = "--ref" ]; then
  want_ref="torch==2.13.0 transformers==5.17.0 safetensors numpy tokenizers"
  if ! stamp_ok .venv-ref "$want_ref"; then
    py="$(find_python 3.11)"
    echo "[bootstrap] creating .venv-ref with $py (torch CPU wheel from local disk)" >&2
    rm -rf .venv-ref
    "$py" -m venv .venv-ref
    # shellcheck disable=SC2086
    pip_quiet .venv-ref $want_ref
    .venv-ref/bin/python -c 'import torch, transformers, safetensors' \
      || { echo "[bootstrap] .venv-ref is incomplete" >&2; exit 1; }
    printf '%s' "$want_ref" > .venv-ref/.stamp
  fi
fi
