# Installing what the benchmarks need on a fresh machine (sourced; expects log and die).

# apt_need PKG...: installs the Debian packages that are missing (the scripts run as root,
# as CI does), so a fresh machine needs nothing by hand.
apt_need() {
    local missing=() p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} = 0 ] && return 0
    log "installing ${missing[*]}"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# need_virtiofsd: the baseline daemon, built from crates.io if it is not there; sets VIRTIOFSD.
need_virtiofsd() {
    VIRTIOFSD=${VIRTIOFSD:-$(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")}
    [ -x "$VIRTIOFSD" ] && return 0
    apt_need libcap-ng-dev libseccomp-dev
    log "building virtiofsd (cargo install --locked virtiofsd)"
    cargo install --locked virtiofsd >&2 || die "cargo install virtiofsd failed"
    VIRTIOFSD=$HOME/.cargo/bin/virtiofsd
}
