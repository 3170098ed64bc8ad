"""No secret has a usable public default.

The embedded default generates its secrets on first start and keeps them in the data directory
(private file, written atomically, the same for every process that starts with it); with
DATABASE_URL, or listening beyond loopback, `iafactory serve` refuses to start until real
secrets are configured, naming each missing setting on one `error:` line. The built-in values of
earlier versions, which were public, are refused wherever they turn up.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from conftest import SECRET_ENV
from iafactory import secret_store
from iafactory.config import KNOWN_DEV_SECRETS, ConfigError, Settings, serving_problems, with_embedded_secrets

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): secrets checked before
# anything touches a database (the tests with DATABASE_URL assert that nothing was written).
pytestmark = pytest.mark.server_independent

OLD_JWT_DEFAULT = "dev-only-secret-change-me-in-production-0123456789"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any IAFACTORY_* setting or DATABASE_URL, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAFACTORY_") and k != "DATABASE_URL"}
    return {**env, **extra}


def iafactory(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """The installed command. A serve that does not refuse would run until killed: the timeout
    turns that into a failure rather than a hung suite."""
    exe = Path(sys.executable).with_name("iafactory")
    try:
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"`iafactory {' '.join(args)}` did not refuse to start: {err.stderr!r}")


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def migrated(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT to_regclass('public.schema_migrations') IS NOT NULL").fetchone()[0]


# --- the embedded default ----------------------------------------------------------------------


def test_embedded_default_generates_private_secrets_and_keeps_them(tmp_path: Path) -> None:
    first = with_embedded_secrets(Settings(database_url=None, data_dir=tmp_path))
    values = {name: first.secret(name) for name in secret_store.GENERATED}
    assert all(len(v.encode()) >= 32 for v in values.values())
    assert not set(values.values()) & KNOWN_DEV_SECRETS
    assert len(set(values.values())) == len(values)
    path = secret_store.path_in(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.generated_secrets == set(secret_store.GENERATED)
    # The next start (another process, tomorrow) reads the same ones.
    again = with_embedded_secrets(Settings(database_url=None, data_dir=tmp_path))
    assert {name: again.secret(name) for name in secret_store.GENERATED} == values
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_configured_secrets_win_over_generated_ones(tmp_path: Path) -> None:
    mine = "a-configured-secret-of-forty-characters-x"
    settings = with_embedded_secrets(Settings(database_url=None, data_dir=tmp_path, jwt_secret=mine))
    assert settings.secret("jwt_secret") == mine
    assert "jwt_secret" not in settings.generated_secrets and "api_key_secret" in settings.generated_secrets


def test_no_secret_is_generated_for_an_external_database(tmp_path: Path) -> None:
    settings = with_embedded_secrets(Settings(database_url="postgresql://x@db.example/app", data_dir=tmp_path))
    assert settings.jwt_secret is None and not secret_store.path_in(tmp_path).exists()
    with pytest.raises(ConfigError, match="IAFACTORY_JWT_SECRET is not set"):
        settings.secret("jwt_secret")


def _first_start(data_dir: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    barrier.wait()  # every process reaches the empty directory at the same moment
    out.put(secret_store.load_or_create(Path(data_dir)))


def test_processes_starting_together_all_get_the_same_secrets(tmp_path: Path) -> None:
    """serve --workers N, or a worker started next to serve: one set of secrets for all of them."""
    ctx = multiprocessing.get_context("spawn")
    n = 8
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_first_start, args=(str(tmp_path), barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r == results[0] for r in results), results
    assert secret_store.load_or_create(tmp_path) == results[0]
    assert [p.name for p in tmp_path.iterdir()] == [secret_store.FILE_NAME]


def test_a_store_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret_store.load_or_create(tmp_path)
    path = secret_store.path_in(tmp_path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        secret_store.load_or_create(tmp_path)


# --- serve refuses public or missing secrets -----------------------------------------------------


def test_serve_with_database_url_and_no_secrets_refuses_to_start(empty_db: str, tmp_path: Path) -> None:
    line = one_error_line(iafactory("serve", env=clean_env(DATABASE_URL=empty_db), cwd=tmp_path))
    for name in ("IAFACTORY_JWT_SECRET", "IAFACTORY_API_KEY_SECRET", "IAFACTORY_APP_DB_PASSWORD"):
        assert f"{name} is not set" in line, line
    assert not migrated(empty_db)  # refused before touching the database


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (OLD_JWT_DEFAULT, "a public development value"),
        ("short-secret", "too short: at least 32 bytes"),
    ],
)
def test_serve_refuses_a_public_or_short_jwt_secret(empty_db: str, tmp_path: Path, value: str, said: str) -> None:
    env = clean_env(**{**SECRET_ENV, "IAFACTORY_JWT_SECRET": value}, DATABASE_URL=empty_db)
    line = one_error_line(iafactory("serve", "--no-migrate", env=env, cwd=tmp_path))
    assert f"IAFACTORY_JWT_SECRET is {said}" in line, line
    assert "IAFACTORY_API_KEY_SECRET" not in line and "IAFACTORY_APP_DB_PASSWORD" not in line


def test_serve_refuses_the_old_app_db_password(empty_db: str, tmp_path: Path) -> None:
    env = clean_env(**{**SECRET_ENV, "IAFACTORY_APP_DB_PASSWORD": "iafactory-app-dev-password"}, DATABASE_URL=empty_db)
    line = one_error_line(iafactory("serve", env=env, cwd=tmp_path))
    assert "IAFACTORY_APP_DB_PASSWORD is a public development value" in line


def test_serve_on_a_public_interface_needs_configured_secrets(tmp_path: Path) -> None:
    """The embedded default is fine on loopback with generated secrets; listening on every
    interface needs configured ones (the embedded database's password does not matter: it only
    answers on a local socket)."""
    env = clean_env(IAFACTORY_DATA_DIR=str(tmp_path / "data"))
    line = one_error_line(iafactory("serve", "--host", "0.0.0.0", env=env, cwd=tmp_path))
    assert "IAFACTORY_JWT_SECRET must be configured to listen on 0.0.0.0" in line
    assert "IAFACTORY_API_KEY_SECRET must be configured" in line
    assert "IAFACTORY_APP_DB_PASSWORD" not in line


def test_serving_checks_accept_real_secrets(tmp_path: Path) -> None:
    """Control for the refusals above: the same checks pass with configured secrets, and with
    generated ones on loopback."""
    configured = Settings(
        database_url="postgresql://x@db.example/app",
        **{k.removeprefix("IAFACTORY_").lower(): v for k, v in SECRET_ENV.items()},
    )
    assert serving_problems(configured, "0.0.0.0") == []
    embedded = with_embedded_secrets(Settings(database_url=None, data_dir=tmp_path))
    assert serving_problems(embedded, "127.0.0.1") == []
    assert serving_problems(embedded, "::1") == []
    assert len(serving_problems(embedded, "0.0.0.0")) == 2


def test_a_previous_jwt_key_needs_an_expiry() -> None:
    settings = Settings(
        database_url="postgresql://x@db.example/app",
        **{k.removeprefix("IAFACTORY_").lower(): v for k, v in SECRET_ENV.items()},
        jwt_previous_secret="the-key-we-signed-with-until-today-0123456789",
    )
    assert any("IAFACTORY_JWT_PREVIOUS_SECRET_EXPIRES_AT is not set" in p for p in serving_problems(settings, "::1"))


def test_migrate_with_database_url_needs_the_app_role_password(empty_db: str, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=empty_db)
    line = one_error_line(iafactory("migrate", env=env, cwd=tmp_path))
    assert "IAFACTORY_APP_DB_PASSWORD is not set" in line
    assert not migrated(empty_db)
