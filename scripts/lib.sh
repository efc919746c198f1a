# shellcheck shell=bash
# Shared helpers for husk's build and test scripts. Source it; do not run it.

# HUSK_CACHE_DIR holds what is built or downloaded outside the checkout (guest kernel builds,
# the test host's kernel): it survives fresh clones, so a second build is instant.
: "${HUSK_CACHE_DIR:=/var/cache/husk}"
export HUSK_CACHE_DIR

die() {
    echo "error: $*" >&2
    exit 1
}

log() {
    echo "==> $*" >&2
}

# need_pkgs PKG...: installs the Debian packages that are missing, with apt-get.
need_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}: run as root or install them"
    log "installing ${missing[*]}"
    if [ -z "${HUSK_APT_UPDATED:-}" ]; then
        apt-get update -qq >&2 || die "apt-get update failed"
        export HUSK_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# need_rust_target TRIPLE: adds a rustup target when it is missing.
need_rust_target() {
    rustup target list --installed 2>/dev/null | grep -qx "$1" && return 0
    log "adding rust target $1"
    rustup target add "$1" >&2 || die "rustup target add $1 failed"
}

# repo_root: the checkout's top directory.
repo_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}
