# syntax=docker/dockerfile:1
# HFF serve images (BuildKit, i.e. Docker >= 23, or podman/buildah). Targets:
#   serve  the REST service only: onnxruntime, no torch, no pip or compilers; runs as uid 10001
#          docker build --target serve -t hff-serve .
#   train  hff-train and hff-export on CPU torch (TORCH_INDEX_URL selects another torch build)
#          docker build --target train -t hff-train .
#   proxy  HAProxy from Debian's packages, in front of the compose file's `api` replicas
#          (docker/haproxy.cfg): docker build --target proxy -t hff-proxy .
# GPU serving is the serve target on an NVIDIA CUDA runtime base with onnxruntime-gpu:
#          docker build --target serve -t hff-serve-gpu \
#            --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 \
#            --build-arg SERVE_EXTRA=serve-gpu .
#          The base's CUDA and cuDNN majors must be the ones onnxruntime-gpu was built for (PyPI's
#          1.31: CUDA 13, cuDNN 9); the host needs the NVIDIA driver and Container Toolkit.
# Build arguments:
#   BASE_IMAGE       base of every stage; Debian bookworm-slim, or a CUDA runtime image for GPU
#   PROXY_BASE_IMAGE base of the proxy image (Debian, for its haproxy package)
#   SERVE_EXTRA      the pyproject extras the serve target installs: serve, or serve-gpu; add
#                    granian ("serve granian") to run it with HFF_SERVER=granian (+22 MB)
#   TORCH_INDEX_URL  extra pip index for torch in the train target; the default is PyTorch's CPU
#                    index (PyPI's torch is the CUDA build); .../whl/cu130 selects CUDA 13.0;
#                    empty = PyPI (and any local wheels, below) only
#   MODEL_DIR        an exported model dir inside the build context to bake into serve at
#                    /models/default (default: none; mount a volume on /models instead)
#   PIP_CERT         a CA bundle for pip inside the build (machines behind a TLS proxy)
# Local wheels: `--build-context wheels=DIR` lets pip install from DIR (e.g. a CPU torch wheel on
# a machine without PyTorch's index); without it the `wheels` stage below is empty.

ARG BASE_IMAGE=debian:bookworm-slim
ARG PROXY_BASE_IMAGE=debian:bookworm-slim
ARG MODEL_DIR=

FROM scratch AS wheels

# Python and the unprivileged user, shared by the builders and the final images.
FROM ${BASE_IMAGE} AS runtime-base
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
        /usr/share/doc/* /usr/share/man/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/hff \
        --shell /usr/sbin/nologin hff \
    && mkdir -p /models /runs \
    && chown hff:hff /models /runs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A venv in /opt/venv; the serve image copies it and leaves pip and python3-venv behind.
FROM runtime-base AS builder
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && python3 -m venv /opt/venv
WORKDIR /src
COPY constraints.txt ./

# Each image's requirements, from pyproject.toml. The installs below copy only these lists, so
# an edit elsewhere in pyproject.toml does not reinstall the dependencies (the slow layers).
FROM runtime-base AS requirements
ARG SERVE_EXTRA=serve
WORKDIR /src
COPY pyproject.toml docker/requirements.py ./
# $SERVE_EXTRA unquoted: it may name several extras
RUN python3 requirements.py $SERVE_EXTRA > serve.txt && python3 requirements.py train > train.txt

# Dependencies first (they change rarely), then the source.
FROM builder AS serve-venv
ARG PIP_CERT
COPY --from=requirements /src/serve.txt requirements.txt
RUN --mount=type=bind,from=wheels,target=/run/wheels \
    pip install --no-cache-dir --find-links /run/wheels -c constraints.txt -r requirements.txt
COPY pyproject.toml README.md LICENSE ./
COPY contract contract
COPY app app
RUN pip install --no-cache-dir --no-deps . \
    && pip uninstall --yes pip setuptools \
    && rm -f /opt/venv/bin/hff-train /opt/venv/bin/hff-export

# ---- train: `hff-train`, `hff-export`, and the compose job `hff-train-default`. Built on the
# builder itself (it keeps pip; size matters less here), so a source edit re-runs only the small
# layers at the end instead of copying the 1.4 GB venv again.
FROM builder AS train
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_CERT
# jemalloc: hff-train re-executes itself on it (training/allocator.py; README, Malloc).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb
COPY --from=requirements /src/train.txt requirements.txt
RUN --mount=type=bind,from=wheels,target=/run/wheels \
    pip install --no-cache-dir --find-links /run/wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -c constraints.txt -r requirements.txt
COPY docker/train-default.sh /usr/local/bin/hff-train-default
COPY pyproject.toml README.md LICENSE ./
COPY contract contract
COPY model model
COPY training training
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /src/build /opt/venv/bin/hff-serve
USER hff
WORKDIR /home/hff
CMD ["hff-train", "--help"]

# ---- proxy: HAProxy (Debian's package) balancing the compose `api` replicas, checking /readyz
FROM ${PROXY_BASE_IMAGE} AS proxy
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
        /usr/share/doc/* /usr/share/man/*
COPY docker/haproxy.cfg /etc/haproxy/haproxy.cfg
RUN haproxy -c -f /etc/haproxy/haproxy.cfg
USER haproxy
EXPOSE 8080 8404
# SIGUSR1 stops it gracefully (compose: stop_signal); -db: foreground, logs to stdout
CMD ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]

# ---- serve: `hff-serve` on HFF_MODEL_DIR (a volume on /models, or a model baked in), or on the
# model repository HFF_MODEL_REPOSITORY names (compose: /models/repository), which wins when set
FROM runtime-base AS serve-base
COPY --from=serve-venv /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/hff-healthcheck
ENV HFF_HOST=0.0.0.0 \
    HFF_PORT=8000 \
    HFF_MODEL_DIR=/models/default

FROM serve-base AS serve-base-baked
ARG MODEL_DIR
COPY --chown=hff:hff ${MODEL_DIR}/ /models/default/

# serve-base, or serve-base-baked when MODEL_DIR is given.
FROM serve-base${MODEL_DIR:+-baked} AS serve
USER hff
WORKDIR /home/hff
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["hff-healthcheck"]
ENTRYPOINT ["hff-serve"]
