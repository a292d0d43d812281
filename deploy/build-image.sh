#!/usr/bin/env bash
# Build the pgpush image (deploy/Dockerfile), with or without access to an image registry.
#
#   deploy/build-image.sh                    # offline: a local Debian base, then the image
#   deploy/build-image.sh --official-base    # online: the Dockerfile's default base (pulled from Docker Hub)
#   deploy/build-image.sh --tag registry.example.com/team/pgpush:0.4.0
#
# Offline, the base is built from Debian's packages instead of pulled: debootstrap (--variant=minbase) installs
# python3, python3-venv and ca-certificates into a folder, which `docker import` turns into the image
# $PGPUSH_BASE_IMAGE (default pgpush-base:<suite>; built once, reused until --rebuild-base). It carries this
# machine's CA bundle (/etc/ssl/certs/ca-certificates.crt), so pip inside the build trusts what this machine
# trusts on its way to the package index; the build runs with --network host. Only the package index (PyPI)
# and Debian's archive are contacted: no image registry.
#
# Needs: a running Docker engine (>= 20.10, BuildKit is built in); debootstrap and root for the local base.
# Environment: DOCKER (the client; default /usr/bin/docker when present, as a newer client earlier on PATH may
# want a buildx plugin), DEBIAN_SUITE (default bookworm), DEBIAN_MIRROR (default: the
# first Debian URI apt is configured with, else http://deb.debian.org/debian).
# Prints the image name and its size last.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)"
tag="ghcr.io/example/pgpush:${version:?no version in pyproject.toml}"
official_base=0
rebuild_base=0
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
        --official-base) official_base=1; shift ;;
        --rebuild-base) rebuild_base=1; shift ;;
        -h|--help) usage ;;
        *) echo "build-image.sh: unknown argument $1" >&2; usage ;;
    esac
done

if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
# RUN --mount (the wheels never become a layer) needs BuildKit; Docker 20.10 uses it only when asked.
export DOCKER_BUILDKIT=1

# bookworm's python3 is 3.11, the version the official base has.
debian_suite() { echo "${DEBIAN_SUITE:-bookworm}"; }

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    # deb822 sources (URIs: …) first, then one-line sources (deb URI suite …); the main archive, not security.
    uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)\/\{0,1\}$/\1/p' | head -n 1)"
    if [ -z "$uri" ]; then
        uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | sed -n 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]*\/debian\)\/\{0,1\}[[:space:]].*/\2/p' | head -n 1)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

build_local_base() {
    local base="$1" suite mirror rootfs
    suite="$(debian_suite)"
    mirror="$(debian_mirror)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        echo "build-image.sh: debootstrap is missing (apt-get install debootstrap), or use --official-base" >&2
        exit 1
    fi
    started=$SECONDS
    rootfs="$(mktemp -d)"
    # The folder is root's and holds a whole system: removed whatever happens.
    trap 'rm -rf "$rootfs"' EXIT
    echo "==> local base $base: debootstrap $suite from $mirror"
    # Two stages, so dpkg can unpack without an fsync per file (force-unsafe-io, as Debian's own image
    # builds do): a folder that a crash would leave half-made is thrown away anyway.
    {
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates --foreign \
            "$suite" "$rootfs" "$mirror" \
            && mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d" \
            && echo force-unsafe-io >"$rootfs/etc/dpkg/dpkg.cfg.d/pgpush-build" \
            && chroot "$rootfs" /debootstrap/debootstrap --second-stage \
            && rm "$rootfs/etc/dpkg/dpkg.cfg.d/pgpush-build"
    } >"$rootfs.log" 2>&1 || {
        tail -n 30 "$rootfs.log" >&2
        exit 1
    }
    rm -f "$rootfs.log"
    # This machine's trust store, so pip in the build reaches the index the way this machine does.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    # Nothing an image needs: package lists, caches, documentation.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | "$DOCKER" import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' \
        - "$base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "==> local base $base: built in $((SECONDS - started)) s"
}

build_args=()
if [ "$official_base" = 0 ]; then
    base="${PGPUSH_BASE_IMAGE:-pgpush-base:$(debian_suite)}"
    if [ "$rebuild_base" = 1 ] || ! "$DOCKER" image inspect "$base" >/dev/null 2>&1; then
        build_local_base "$base"
    else
        echo "==> local base $base: present (--rebuild-base to rebuild it)"
    fi
    build_args+=(--build-arg "BASE_IMAGE=$base")
fi

echo "==> image $tag"
started=$SECONDS
"$DOCKER" build --network host "${build_args[@]}" -f deploy/Dockerfile -t "$tag" .
size="$("$DOCKER" image inspect --format '{{.Size}}' "$tag")"
echo "built $tag in $((SECONDS - started)) s: $((size / 1024 / 1024)) MiB"
