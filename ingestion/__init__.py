"""RAG ingestion (a Kafka consumer: load, chunk, embed, upsert). Not built yet."""
