"""`IAFACTORY_CELLS`: which database serves which regions.

    IAFACTORY_CELLS='{"dz": {"url": "postgresql://…/iafactory_dz", "regions": ["DZ"]},
                      "eu": {"url": "postgresql://…/iafactory_eu", "app_url": "postgresql://…@pgbouncer/…",
                             "regions": ["CH", "FR", "BE", "CA"]}}'

Parsed here rather than by pydantic-settings so that a mistake is one line naming the variable and
the cell. Every region must be served by exactly one cell: a region without a cell would have
nowhere to live, and one with two could be placed in either.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, get_args

from iafactory.config import ConfigError, Settings
from iafactory.tenancy.schemas import Region

REGIONS: tuple[str, ...] = get_args(Region)
DEFAULT_CELL = "default"
# With cells configured, the DATABASE_URL database: routing facts only, and it serves no region.
DIRECTORY = "directory"
_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_KEYS = {"url", "app_url", "regions"}
ENV = "IAFACTORY_CELLS"


@dataclass(frozen=True)
class Cell:
    name: str
    # Admin URL (migrations, operator commands). None: the default cell, on DATABASE_URL or the
    # embedded server (resolved when used: the embedded server starts only when needed).
    url: str | None
    app_url: str | None
    regions: tuple[str, ...]

    def settings(self, settings: Settings) -> Settings:
        """The settings for this cell's own database: its admin URL, and the app role's URLs derived
        from it unless the cell gives a pooled one."""
        if self.url is None:
            return settings
        return settings.model_copy(
            update={"database_url": self.url, "app_database_url": self.app_url, "app_direct_database_url": None}
        )


def cells(settings: Settings) -> dict[str, Cell]:
    """The configured cells by name, in configuration order. ConfigError says what is wrong."""
    if not settings.cells:
        return {DEFAULT_CELL: Cell(DEFAULT_CELL, None, None, REGIONS)}
    try:
        raw = json.loads(settings.cells)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{ENV}: not valid JSON ({err.msg} at char {err.pos})") from err
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f'{ENV}: must be a JSON object of cells, e.g. {{"dz": {{"url": "…", "regions": ["DZ"]}}}}')
    found: dict[str, Cell] = {}
    served_by: dict[str, str] = {}
    for name, spec in raw.items():
        if name == DIRECTORY:
            raise ConfigError(f"{ENV}: {DIRECTORY!r} names the directory (DATABASE_URL), not a cell")
        found[name] = cell = _cell(name, spec)
        for region in cell.regions:
            if region in served_by:
                raise ConfigError(f"{ENV}: region {region} is served by two cells ({served_by[region]} and {name})")
            served_by[region] = name
    missing = [r for r in REGIONS if r not in served_by]
    if missing:
        raise ConfigError(f"{ENV}: no cell serves {', '.join(missing)} (every region needs exactly one)")
    return found


def _cell(name: str, spec: Any) -> Cell:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{ENV}: cell name {name!r} must be 1-32 lowercase letters, digits or '-', starting with a letter"
        )
    if not isinstance(spec, dict):
        raise ConfigError(f"{ENV}: cell {name}: must be an object with url, regions and optionally app_url")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise ConfigError(f"{ENV}: cell {name}: unknown key {unknown[0]!r} (known: app_url, regions, url)")
    url, app_url, regions = spec.get("url"), spec.get("app_url"), spec.get("regions")
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{ENV}: cell {name}: url is required (the cell's admin PostgreSQL URL)")
    if app_url is not None and (not isinstance(app_url, str) or not app_url.strip()):
        raise ConfigError(f"{ENV}: cell {name}: app_url must be a URL")
    if not isinstance(regions, list) or not regions:
        raise ConfigError(f'{ENV}: cell {name}: regions must be a non-empty list, e.g. ["DZ"]')
    for region in regions:
        if region not in REGIONS:
            raise ConfigError(f"{ENV}: cell {name}: unknown region {region!r} (known: {', '.join(REGIONS)})")
    if len(set(regions)) != len(regions):
        raise ConfigError(f"{ENV}: cell {name}: a region is listed twice")
    return Cell(name, url, app_url, tuple(regions))


def directory_cell() -> Cell:
    """The directory as a migration target: the DATABASE_URL (or embedded) database, serving no region,
    so that its tenants table refuses every tenant."""
    return Cell(DIRECTORY, None, None, ())


def cell_for_region(all_cells: dict[str, Cell], region: str) -> Cell:
    for cell in all_cells.values():
        if region in cell.regions:
            return cell
    raise ConfigError(f"no cell serves region {region}")


def serving_problem(settings: Settings) -> str | None:
    """Why this process cannot serve requests with the cells configured (a bad IAFACTORY_CELLS), or None."""
    try:
        cells(settings)
    except ConfigError as err:
        return str(err)
    return None
