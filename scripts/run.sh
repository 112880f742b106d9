#!/usr/bin/env bash
# sealift's one entry point for a fresh Debian machine (run as root):
#   bash scripts/run.sh demo [ARGS...]   set up, then `sealift demo ARGS...`
#   bash scripts/run.sh test [ARGS...]   set up, then lint and the whole test suite
#   bash scripts/run.sh setup            set up only
#   bash scripts/run.sh sealift ARGS...  set up, then any sealift command
# Set-up is idempotent: Debian packages are installed only when missing, the
# virtual environment is reused, and Python packages are reinstalled (and the
# native relay core, src/sealift/host/_relaycore.c, compiled in place) only when
# pyproject.toml, setup.py or a C source changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.sealift-setup-stamp"

# Debian packages the code and the tests use (gcc, libipsec-mb-dev, libssl-dev and python3-dev build the native relay core;
# libvirt-dev and pkg-config build libvirt-python).
DEBIAN_PACKAGES=(python3-venv iproute2 iputils-ping procps qemu-system-x86 gcc libc6-dev libssl-dev libipsec-mb-dev python3-dev tshark openssh-server openssh-client strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins nftables wireguard-go prometheus systemd debootstrap qemu-utils libvirt-dev pkg-config libvirt-daemon-system libvirt-clients syslinux syslinux-common syslinux-efi mtools ovmf)

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }

install_debian_packages() {
    local missing=()
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${missing[*]} (run as root, or install them yourself)"
        return 1
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_bin() {
    # Prefer a Python >= 3.11 already on PATH (the image's), else Debian's.
    for candidate in python3.11 python3 /usr/bin/python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"; return 0
        fi
    done
    log "no Python >= 3.11 with venv found"; return 1
}

install_python_packages() {
    local want
    # What the install builds from: a changed C file is compiled again on the next run.
    want="$(cd "$ROOT" && cat pyproject.toml setup.py $(find src -name '*.c' -o -name '*.h' | sort) | sha256sum | cut -d' ' -f1)"
    if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
        && "$VENV/bin/python" -c 'import sealift.host._relaycore' 2>/dev/null; then
        return 0
    fi
    [ -x "$VENV/bin/python" ] || { log "creating virtual environment $VENV"; "$(python_bin)" -m venv "$VENV"; }
    log "installing Python packages"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test,bench]" 2>&1 | grep -v -i warning || true
    "$VENV/bin/python" -c 'import sealift.host._relaycore' || { log "sealift (or its native relay core) did not install"; return 1; }
    echo "$want" > "$STAMP"
}

lint() {
    # The tree's shape before its behaviour: lint, formatting, types (ruff and mypy, configured in pyproject.toml).
    log "ruff check + ruff format --check + mypy"
    "$VENV/bin/ruff" check src tests bench
    "$VENV/bin/ruff" format --check src tests bench
    "$VENV/bin/mypy" src/sealift
}

setup() {
    install_debian_packages
    install_python_packages
}

cmd="${1:-}"; shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup; exec "$VENV/bin/sealift" demo "$@" ;;
    test) setup; cd "$ROOT"; lint; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    sealift) setup; exec "$VENV/bin/sealift" "$@" ;;
    *) echo "usage: bash scripts/run.sh {demo|test|setup|sealift} [ARGS...]" >&2; exit 2 ;;
esac
