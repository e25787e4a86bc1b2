"""Files of OpenAI's Batch API: content in a `FileStore`, metadata in Redis, each file its
tenant's (another tenant gets a 404, as if it did not exist).

`FileStore` is the interface an object store would implement; `DirectoryStore` keeps files in
SLUICE_FILES_DIR, which several API replicas share as a ReadWriteMany volume (Kubernetes) or a
volume (compose). Metadata is `{prefix}:file:<id>` (a FileObject) and, per tenant, the sorted
set `{prefix}:files:<tenant>` by creation time, so listing needs no keyspace scan.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Protocol

from redis.asyncio import Redis

from api.openai_protocol import FileDeleted, FileList, FileObject
from api.openai_serving import OpenAIError
from shared.settings import Settings


class FileStore(Protocol):
    def write(self, file_id: str, data: bytes) -> None: ...

    def read(self, file_id: str) -> bytes: ...

    def delete(self, file_id: str) -> None: ...


class DirectoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write(self, file_id: str, data: bytes) -> None:
        # Whole or not at all: another replica may read it as soon as its metadata exists.
        tmp = self.root / f".{file_id}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.root / file_id)

    def read(self, file_id: str) -> bytes:
        return (self.root / file_id).read_bytes()

    def delete(self, file_id: str) -> None:
        (self.root / file_id).unlink(missing_ok=True)


class Files:
    def __init__(self, settings: Settings, redis: Redis, store: FileStore) -> None:
        self.settings = settings
        self.redis = redis
        self.store = store

    def _key(self, file_id: str) -> str:
        return f"{self.settings.redis_prefix}:file:{file_id}"

    def _index(self, tenant: str) -> str:
        return f"{self.settings.redis_prefix}:files:{tenant}"

    async def create(self, tenant: str, filename: str, data: bytes, purpose: str) -> FileObject:
        file = FileObject(
            id=f"file-{uuid.uuid4().hex}", bytes=len(data), created_at=int(time.time()),
            filename=filename[:255], purpose=purpose, sluice_tenant=tenant,  # type: ignore[arg-type]
        )  # fmt: skip
        await asyncio.to_thread(self.store.write, file.id, data)  # content first, then the record
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(file.id), file.model_dump_json())
            pipe.zadd(self._index(tenant), {file.id: time.time()})
            await pipe.execute()
        return file

    async def get(self, file_id: str, tenant: str) -> FileObject:
        raw = await self.redis.get(self._key(file_id)) if file_id.startswith("file-") else None
        file = FileObject.model_validate_json(raw) if raw else None
        if file is None or file.sluice_tenant != tenant:
            raise OpenAIError(404, f"No such File object: {file_id}", "file_id")
        return file

    async def content(self, file_id: str, tenant: str) -> bytes:
        file = await self.get(file_id, tenant)
        return await asyncio.to_thread(self.store.read, file.id)

    async def list(self, tenant: str, purpose: str | None, limit: int) -> FileList:
        ids = [i.decode() for i in await self.redis.zrevrange(self._index(tenant), 0, -1)]
        raws = await self.redis.mget([self._key(i) for i in ids]) if ids else []
        files = [FileObject.model_validate_json(r) for r in raws if r]
        files = [f for f in files if purpose is None or f.purpose == purpose]
        return FileList(data=files[:limit], has_more=len(files) > limit)

    async def delete(self, file_id: str, tenant: str) -> FileDeleted:
        file = await self.get(file_id, tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(file.id))
            pipe.zrem(self._index(tenant), file.id)
            await pipe.execute()
        await asyncio.to_thread(self.store.delete, file.id)
        return FileDeleted(id=file.id)
