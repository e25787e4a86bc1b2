#!/bin/sh
# One-shot topic creation for docker-compose.yml (the `kafka-init` service), before any Sluice
# process starts. Every Sluice process also calls shared/kafka.py ensure_topics() at start, which
# creates missing topics; doing it here first means the partition counts come from one place you
# can read, the processes find the topics already there, and a broker that auto-creates topics
# (num.partitions) never gets to pick the count. Same names and counts as shared/settings.py.
set -eu

bootstrap="${KAFKA_BOOTSTRAP:-kafka:9092}"
topics_sh="${KAFKA_TOPICS_SH:-/opt/kafka/bin/kafka-topics.sh}"

create() {  # name partitions [--config key=value ...]
    name="$1" partitions="$2"
    shift 2
    # --if-not-exists: a restart of the stack keeps the existing topics and their data.
    "$topics_sh" --bootstrap-server "$bootstrap" --create --if-not-exists \
        --topic "$name" --partitions "$partitions" --replication-factor 1 "$@"
    # An existing topic with fewer partitions (e.g. made by an older stack) is grown, never shrunk
    # (Kafka cannot). Growing re-maps keys to partitions: harmless for request ids; a document
    # updated during the change may have its two versions indexed out of order once.
    current="$("$topics_sh" --bootstrap-server "$bootstrap" --describe --topic "$name" \
        | sed -n 's/.*PartitionCount: *\([0-9][0-9]*\).*/\1/p' | head -n 1)"
    if [ -n "$current" ] && [ "$current" -lt "$partitions" ]; then
        "$topics_sh" --bootstrap-server "$bootstrap" --alter --topic "$name" --partitions "$partitions"
    fi
}

create "${SLUICE_REQUESTS_TOPIC:-sluice.requests}" "${SLUICE_REQUESTS_PARTITIONS:-8}"
create "${SLUICE_REQUESTS_TOPIC:-sluice.requests}.dlq" 1
create "${SLUICE_BATCH_REQUESTS_TOPIC:-sluice.batch.requests}" "${SLUICE_REQUESTS_PARTITIONS:-8}"
create "${SLUICE_BATCH_RESULTS_TOPIC:-sluice.batch.results}" "${SLUICE_REQUESTS_PARTITIONS:-8}"
create "${SLUICE_BATCH_REQUESTS_TOPIC:-sluice.batch.requests}.dlq" 1
create "${SLUICE_BATCH_EMBEDDINGS_TOPIC:-sluice.batch.embeddings}" "${SLUICE_REQUESTS_PARTITIONS:-8}"
# Documents up to SLUICE_MAX_DOCUMENT_BYTES (5 MiB) plus their JSON envelope.
create "${SLUICE_INGEST_TOPIC:-sluice.ingest}" "${SLUICE_INGEST_PARTITIONS:-4}" \
    --config max.message.bytes=8388608
create "${SLUICE_INGEST_TOPIC:-sluice.ingest}.dlq" 1 --config max.message.bytes=8388608

# For the log: what the stack starts with.
"$topics_sh" --bootstrap-server "$bootstrap" --describe --topic 'sluice\..*'
