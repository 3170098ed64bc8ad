"""The purge of spent account records (migration 029's app.purge_account_records), run by the
worker's periodic maintenance next to the idempotency keys' (knowledge/worker.py): sessions ended
more than IAFACTORY_SESSION_RETENTION_DAYS ago with their refresh tokens, used or expired reset,
verification and invitation tokens past IAFACTORY_SPENT_TOKEN_RETENTION_DAYS, and security events
older than IAFACTORY_SECURITY_EVENT_RETENTION_DAYS. The tables are read and written only by
definer functions, so the purge is one too; it deletes a batch of each kind per call, and is
called again while any kind filled its batch."""

from __future__ import annotations

from dataclasses import dataclass

from iafactory.config import Settings
from iafactory.db.scope import Database

BATCH = 1000


@dataclass(frozen=True)
class Retention:
    session_days: int = 30
    token_days: int = 30
    event_days: int = 180

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        return cls(
            settings.session_retention_days,
            settings.spent_token_retention_days,
            settings.security_event_retention_days,
        )


async def purge_account_records(db: Database, retention: Retention, batch: int = BATCH) -> dict[str, int]:
    """Deletes what is past its retention in this cell; the number of rows per kind."""
    total: dict[str, int] = {}
    while True:
        async with db.anonymous() as tx:
            rows = await tx.fetch(
                "SELECT kind, deleted FROM app.purge_account_records(%s, %s, %s, %s)",
                (retention.session_days, retention.token_days, retention.event_days, batch),
            )
        for row in rows:
            total[row["kind"]] = total.get(row["kind"], 0) + row["deleted"]
        if all(row["deleted"] < batch for row in rows):
            return total
