#!/usr/bin/env bash
# Set up podman on a Debian 12 machine that has no Docker engine and no registry (as root):
# podman + runc, and debian:bookworm-slim built from Debian's own packages with debootstrap, so
# `FROM debian:bookworm-slim` resolves locally. Skips what is already done. podman-compose comes
# from pip (the project's `container` extra; `make container-smoke` installs it).
set -euo pipefail

if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap
fi

# crun, podman's default runtime, fails here on cgroups and setrlimit.
conf=/etc/containers/containers.conf
if ! grep -qs '^runtime = "runc"' "$conf"; then
    mkdir -p "$(dirname "$conf")"
    printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' > "$conf"
fi

image=docker.io/library/debian:bookworm-slim
if ! podman image exists "$image"; then
    rootfs=$(mktemp -d /tmp/bookworm-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs"
    # What the official slim image does not carry either (apt-get still works without it).
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | podman import - "$image"
fi
podman image ls "$image"
