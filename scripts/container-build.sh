#!/usr/bin/env bash
# Build the hff-train, hff-serve and hff-proxy images (tags :latest, the names docker-compose.yml
# uses) with Docker or podman.
# Usage: scripts/container-build.sh [train] [serve] [proxy]   (default: all three)
#
# CONTAINER_ENGINE  docker or podman (default: docker when its daemon answers, else podman)
# HFF_WHEELS_DIR    local wheels pip may install from inside the build (default: the first
#                   directory in PIP_FIND_LINKS, if any); a torch wheel there replaces
#                   PyTorch's CPU index, which such machines usually cannot reach
# TORCH_INDEX_URL   torch's pip index for the train image; set (even empty) it always wins
# Extra arguments for every build can go in HFF_BUILD_ARGS (e.g. "--no-cache").
set -euo pipefail
cd "$(dirname "$0")/.."

engine="${CONTAINER_ENGINE:-}"
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        echo "container-build: no container engine: install Docker, or podman (README: Containers)" >&2
        exit 2
    fi
fi

args=()
if [ "$engine" = podman ]; then
    # docker format: podman drops HEALTHCHECK from OCI-format images. Host network and the host's
    # CA bundle (mounted, never baked in) are what pip needs behind this project's proxies.
    args+=(--format docker --network host)
    if ! podman image exists docker.io/library/debian:bookworm-slim; then
        echo "container-build: no debian:bookworm-slim image yet; podman will try to pull it" \
            "(without a registry, run scripts/podman-setup.sh first)" >&2
    fi
    ca=/etc/ssl/certs/ca-certificates.crt
    if [ -f "$ca" ]; then
        args+=(-v "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
    fi
fi

wheels="${HFF_WHEELS_DIR-${PIP_FIND_LINKS%% *}}"
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    args+=(--build-context "wheels=$wheels")
fi
if [ -n "${TORCH_INDEX_URL+set}" ]; then
    args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
elif [ -n "$wheels" ] && compgen -G "$wheels/torch-*.whl" >/dev/null; then
    args+=(--build-arg "TORCH_INDEX_URL=")
fi
# shellcheck disable=SC2206  # word splitting of HFF_BUILD_ARGS is the point
args+=(${HFF_BUILD_ARGS:-})

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(train serve proxy)
for target in "${targets[@]}"; do
    case "$target" in
        train | serve | proxy) ;;
        *) echo "container-build: unknown image '$target' (train, serve or proxy)" >&2; exit 2 ;;
    esac
    start=$(date +%s)
    "$engine" build "${args[@]}" --target "$target" -t "hff-$target:latest" .
    echo "container-build: hff-$target:latest built with $engine in $(( $(date +%s) - start )) s"
done
