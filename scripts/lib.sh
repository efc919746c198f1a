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

# need_containerd2: prints the bin directory (containerd, ctr, containerd-shim-runc-v2) of the
# containerd 2.x that Debian sid ships, for the end-to-end tests' second containerd line. The
# package is downloaded with apt-get through a private source list and state under
# $HUSK_CACHE_DIR/containerd2/apt (nothing in /etc/apt changes, nothing is installed) and unpacked
# with dpkg-deb into $HUSK_CACHE_DIR/containerd2/containerd_<version>; each binary must run here
# and report that version. The version sid had the first time is remembered (containerd2/version),
# so later calls use no network and return at once; HUSK_CONTAINERD2_REFRESH=1 asks sid again.
# Any failure dies naming the step: the tests that need this containerd never skip.
need_containerd2() {
    local base=$HUSK_CACHE_DIR/containerd2 dir version lockfd
    mkdir -p "$base" || die "cannot create $base"
    exec {lockfd}>"$base/.lock" || die "cannot open $base/.lock"
    flock "$lockfd" || die "cannot lock $base/.lock"
    if [ -z "${HUSK_CONTAINERD2_REFRESH:-}" ] && [ -f "$base/version" ] && read -r version <"$base/version" \
        && [ -n "$version" ] && dir=$base/containerd_${version//:/%} && [ -f "$dir/.complete" ]; then
        exec {lockfd}>&-
        echo "$dir/root/usr/bin"
        return 0
    fi
    # A private apt: only sid's main, its lists and archives under $base/apt.
    local apt=$base/apt
    mkdir -p "$apt"/lists/partial "$apt"/cache/archives/partial || die "cannot create $apt"
    echo 'deb http://deb.debian.org/debian sid main' >"$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    log "containerd 2.x: reading Debian sid's package lists (private apt state in $apt)"
    apt-get "${opts[@]}" update -qq >"$apt/update.log" 2>&1 \
        || { cat "$apt/update.log" >&2; die "apt-get update of Debian sid's lists (for containerd 2.x) failed"; }
    version=$(apt-cache "${opts[@]}" show --no-all-versions containerd 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
    # apt-get update exits 0 when a download failed: no version is how that shows.
    [ -n "$version" ] || { cat "$apt/update.log" >&2; die "no containerd in Debian sid's package lists: apt-get update (log above) failed?"; }
    local upstream=${version#*:}
    upstream=${upstream%%[+~-]*}
    [[ "$upstream" == 2.* ]] \
        || die "Debian sid's containerd is $version, not a 2.x: the tests' second containerd line needs one"
    dir=$base/containerd_${version//:/%}
    if [ ! -f "$dir/.complete" ]; then
        local tmp
        tmp=$(mktemp -d "$base/.unpack.XXXXXX") && chmod 0755 "$tmp" || die "mktemp in $base failed"
        log "containerd 2.x: downloading and unpacking Debian sid's containerd $version into $dir"
        (cd "$tmp" && apt-get "${opts[@]}" download -q "containerd=$version" >"$tmp/apt.log" 2>&1) \
            || { cat "$tmp/apt.log" >&2; rm -rf "$tmp"; die "apt-get download containerd=$version (Debian sid) failed"; }
        dpkg-deb -x "$tmp"/containerd_*.deb "$tmp/root" \
            || { rm -rf "$tmp"; die "dpkg-deb -x of containerd $version failed"; }
        rm -f "$tmp"/*.deb "$tmp/apt.log"
        local bin out
        for bin in "containerd --version" "ctr --version" "containerd-shim-runc-v2 -v"; do
            out=$("$tmp/root/usr/bin/"$bin 2>&1) \
                || { rm -rf "$tmp"; die "the unpacked '$bin' (containerd $version) does not run here: $out"; }
            [[ "$out" == *" $upstream"* ]] \
                || { rm -rf "$tmp"; die "the unpacked '$bin' reports '$out', not containerd $upstream"; }
        done
        touch "$tmp/.complete"
        rm -rf "$dir"
        mv "$tmp" "$dir" || die "cannot move the unpacked containerd to $dir"
    fi
    echo "$version" >"$base/version"
    # Older unpacked versions go.
    find "$base" -mindepth 1 -maxdepth 1 -name 'containerd_*' ! -path "$dir" -exec rm -rf {} +
    exec {lockfd}>&-
    echo "$dir/root/usr/bin"
}
