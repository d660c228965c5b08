#!/usr/bin/env bash
# crate-fast's two commands. Each sets everything up (idempotent, fast the second time), then runs:
#
#   ./run.sh train [train.py flags]   the main job: train crate_tiny on the embedded digits data set
#   ./run.sh test  [pytest flags]     the whole test suite
#   ./run.sh mae   [train.py flags]   CRATE-MAE pretraining on digits, then a linear probe (CPU demo)
#
# Set-up: Debian packages FFCV builds against (installed when run as root, else explained), a .venv/
# in the repository root, and this package installed into it in editable mode with its extras.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
FFCV_DEBS="pkg-config libturbojpeg0-dev libopencv-dev"

say() { printf '\033[1m[crate-fast]\033[0m %s\n' "$*" >&2; }

system_packages() {
    # FFCV (the fast data loader) compiles against libturbojpeg and OpenCV's C++ libraries.
    if dpkg -s $FFCV_DEBS >/dev/null 2>&1; then return 0; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Debian packages for FFCV: $FFCV_DEBS"
        if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends $FFCV_DEBS) >/dev/null; then
            return 0
        fi
        say "apt-get failed; continuing without FFCV"
    else
        say "FFCV needs Debian packages that are missing; as root run:"
        say "    apt-get install $FFCV_DEBS"
        say "continuing without FFCV (data loading falls back to torchvision, which is slower)"
    fi
    return 1
}

setup() {
    local extras="dev,bench"
    if system_packages; then extras="dev,bench,data"; fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "crate-fast needs Python >= 3.10"'
        say "creating $VENV with $("$PYTHON" --version)"
        "$PYTHON" -m venv "$VENV"
    fi
    # Reinstall only when what decides the environment changed.
    local stamp="$VENV/.crate-fast-installed"
    local want
    want="$extras $(cat setup.py run.sh | sha256sum | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing crate-fast[$extras] into $VENV (first time: a few minutes, torch is large)"
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        local status=0
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" \
            > "$VENV/pip.log" 2>&1 || status=$?
        grep -v "^WARNING: Location" "$VENV/pip.log" >&2 || true
        if [ $status != 0 ] || ! "$VENV/bin/python" -c "import crate_fast, torch, triton"; then
            say "installation failed (pip output above, also in $VENV/pip.log)"
            exit 1
        fi
        echo "$want" > "$stamp"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    train)
        setup
        exec "$VENV/bin/torchrun" --standalone --nproc_per_node=1 train.py \
            --arch crate_tiny --data digits --out runs/digits "$@"
        ;;
    mae)
        setup
        exec "$VENV/bin/torchrun" --standalone --nproc_per_node=1 train.py \
            --arch mae_crate_digits --data digits --out runs/mae_digits --probe "$@"
        ;;
    test)
        setup
        # Any non-zero pytest status fails, including 5 ("no tests collected").
        exec "$VENV/bin/python" -m pytest tests "$@"
        ;;
    *)
        echo "usage: ./run.sh train [train.py flags] | ./run.sh test [pytest flags] | ./run.sh mae [train.py flags]" >&2
        exit 2
        ;;
esac
