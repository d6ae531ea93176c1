# syntax=docker/dockerfile:1
#
# The moderation gRPC service (`moderation serve`). Two variants, chosen with a build argument:
#
#   docker build --build-arg VARIANT=gpu -t mistral-moderation:0.1.0-gpu .   (default)
#   docker build --build-arg VARIANT=cpu -t mistral-moderation:0.1.0-cpu .
#   docker build --build-arg VARIANT=gpu --target test .   (the test suite on the image's torch)
#
# Package indexes (mirrors, proxies): --build-arg PIP_INDEX_URL=... (and PIP_EXTRA_INDEX_URL,
# PIP_TRUSTED_HOST) for PyPI, --build-arg TORCH_INDEX_URL=... for the PyTorch wheels (default:
# download.pytorch.org/whl/cu124 or /cpu). The build needs network access to both (or to the
# mirrors), and to the CUDA images on Docker Hub (nvidia/cuda) or python:3.11-slim.
#
# gpu: CUDA 12.4 runtime on Ubuntu 22.04, Python 3.11 (deadsnakes), torch CUDA wheels and
#      torch's own attention (scaled_dot_product_attention). Serves Mistral 7B Instruct from
#      weights mounted at /models: set MODERATION_MODEL=/models/<checkpoint folder>. Every
#      Python package comes from the package indexes (PIP_INDEX_URL, TORCH_INDEX_URL): the
#      build works offline against mirrors of them. flash-attn is optional:
#      --build-arg FLASH_ATTN=1 adds the project's `gpu` extra, which either fetches a
#      prebuilt wheel from GitHub's release pages (outside any index) or compiles for about an
#      hour; the server uses it when present (attention backend "flash").
# cpu: python:3.11-slim with the torch CPU wheel; serves the built-in demo model (random
#      weights) when MODERATION_MODEL is unset, for laptops and CI.
#
# Needs BuildKit (the default builder since Docker 23): only the stages of the chosen variant
# are built. Weights are never baked in: mount them (deploy/ uses a read-only PVC at /models).
# Runs as the non-root user 10001 and works with a read-only root filesystem (only /tmp is
# written, mount an emptyDir there).

ARG VARIANT=gpu
ARG CUDA_VERSION=12.4.1
ARG PYTHON_VERSION=3.11

# --- Python on the CUDA images (gpu) --------------------------------------------------------
# devel for the builder: nvcc lets flash-attn compile from source when no prebuilt wheel
# matches; runtime for the final image (torch wheels bring their own CUDA libraries).
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-base-gpu
ARG PYTHON_VERSION
ARG DEBIAN_FRONTEND=noninteractive
# Versions come from the deadsnakes PPA and the CUDA image's Ubuntu release; pinning them here
# would break the build whenever the PPA moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" "python${PYTHON_VERSION}-dev" \
        git ninja-build \
    && rm -rf /var/lib/apt/lists/*
RUN ln -sf "/usr/bin/python${PYTHON_VERSION}" /usr/local/bin/python3

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS runtime-base-gpu
ARG PYTHON_VERSION
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*
# The venv copied from the builder points at this interpreter path; keep it identical.
RUN ln -sf "/usr/bin/python${PYTHON_VERSION}" /usr/local/bin/python3

# --- Python on Debian slim (cpu) ------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build-base-cpu
FROM python:${PYTHON_VERSION}-slim AS runtime-base-cpu

# --- builder: a virtualenv with torch, the project and its extras ----------------------------
# The base is one of the stages above, picked by VARIANT; hadolint cannot see through the
# variable and mistakes it for an untagged image.
# hadolint ignore=DL3006
FROM build-base-${VARIANT} AS builder
ARG VARIANT
# Versions that must match each other: flash-attn ships prebuilt wheels per torch/CUDA/Python,
# so the gpu image keeps the torch that flash-attn 2.7.4.post1 has wheels for; the cpu image
# runs the torch `make test` runs (2.13.0). `--target test` runs the suite on either.
ARG TORCH_VERSION_GPU=2.5.1
ARG TORCH_VERSION_CPU=2.13.0
ARG TORCH_CUDA=cu124
ARG TORCH_INDEX_URL
ARG FLASH_ATTN_VERSION=2.7.4.post1
# 0 (default): torch's attention, nothing from outside the indexes; 1: flash-attn too.
ARG FLASH_ATTN=0
# Read by pip when set (mirrors, proxies); unset, pip uses PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAX_JOBS=4
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index of the variant, so the project's `torch` requirement is
# already satisfied and pip does not pull the default (CUDA) wheel into the CPU image.
RUN if [ "$VARIANT" = gpu ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION_GPU}" \
            --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${TORCH_CUDA}}"; \
    elif [ "$VARIANT" = cpu ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION_CPU}" \
            --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"; \
    else \
        echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 1; \
    fi
WORKDIR /src
# The other dependencies from the lock file, every file checked against its hash: the same
# versions in every build (requirements/serve.in says how to regenerate it).
COPY requirements/serve.lock requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/serve.lock
# flash-attn only when asked for (FLASH_ATTN=1, gpu): see the top of this file.
RUN if [ "$FLASH_ATTN" = 1 ] && [ "$VARIANT" = gpu ]; then \
        pip install --no-cache-dir "packaging==24.2" "wheel==0.45.1" "psutil==6.1.1" \
        && pip install --no-cache-dir --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    elif [ "$FLASH_ATTN" != 0 ] && [ "$FLASH_ATTN" != 1 ]; then \
        echo "FLASH_ATTN must be 0 or 1, not '$FLASH_ATTN'" >&2; exit 1; \
    fi
COPY pyproject.toml README.md ./
COPY model/ model/
COPY moderation/ moderation/
# Not editable: the final image holds the installed package, not the sources. The server
# extra (the engine and the server; the base distribution is only the light client) and the
# gpu one are installed above from the lock and the PyTorch index, hence --no-deps; the import
# proves the server's modules are all there.
RUN pip install --no-cache-dir --no-deps "./[server]" \
    && pip check \
    && python -c "import moderation.cli, moderation.serving.grpc.server, model"

# --- test: the suite on the image's torch (docker build --target test) ----------------------
# Not part of the final image. The deploy and packaging tests need the repository (kubectl,
# hadolint, make), so they run with `make test`, not here.
FROM builder AS test
COPY tests/ tests/
RUN pip install --no-cache-dir "./[server,dev]" \
    && python -m pytest -q -p no:cacheprovider tests \
        --ignore=tests/test_deploy.py --ignore=tests/test_install.py \
        --ignore=tests/test_proto_fresh.py --ignore=tests/test_layout.py

# --- final image ------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM runtime-base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="mistral-moderation" \
      org.opencontainers.image.description="Content moderation gRPC service on Mistral 7B Instruct" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.variant="${VARIANT}"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /tmp app \
    && mkdir -p /models \
    && chown app:app /models
COPY --from=builder /opt/venv /opt/venv
# HOME and every cache point into /tmp: the root filesystem is read-only in Kubernetes.
# HF_HUB_OFFLINE: weights come from the mounted folder, never from the network.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    HF_HUB_OFFLINE=1
# Weights: mount a checkpoint folder under /models and set MODERATION_MODEL=/models/<folder>.
# Unset (the default) serves the built-in demo model. No VOLUME instruction: it would give
# every `docker run` an empty anonymous volume instead of failing clearly on a missing mount.
WORKDIR /tmp
USER 10001:10001
# 50051: gRPC (ModerationService, health, reflection); 9464: Prometheus /metrics; 8080: HTTP/JSON
# when MODERATION_HTTP_PORT=8080 (off by default).
EXPOSE 50051 9464 8080
ENTRYPOINT ["moderation"]
CMD ["serve"]
