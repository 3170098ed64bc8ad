"""Queue an email in the transaction of the action that causes it.

    from iafactory.notifications import outbox

    async with db.tenant(ctx) as tx:                     # or db.anonymous(), operator_transaction(url)
        ...                                              # create the invitation
        await outbox.enqueue(tx, "ana@example.ch", "invitation", outbox.language(tenant.settings.get("language")),
                             {"inviter": "Karim", "tenant": "École Ibn Khaldoun", "role": "admin",
                              "link": url, "days": 7})

The message is rendered now (templates.py) and written to the cell's `email_outbox` by
`app.enqueue_email` (migration 024), inside `tx`: if the action is rolled back, so is the email,
and senders are woken only when it commits. `tx` must be a write transaction (not
`read_only=True`, whose statements each commit on their own). A sender (sender.py) delivers it.

The operator's side (`iafactory outbox list|retry`) is here too: `platform.*` functions on the
cell's admin URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iafactory.db.scope import Transaction
from iafactory.notifications.templates import DEFAULT_LANGUAGE, KINDS, LANGUAGES, language, render

__all__ = ["DEFAULT_LANGUAGE", "KINDS", "LANGUAGES", "enqueue", "language", "list_messages", "retry"]

CHANNEL = "email_outbox"  # NOTIFY'd by app.enqueue_email at commit, LISTENed by the senders


async def enqueue(tx: Transaction, to: str, kind: str, language: str | None, context: Mapping[str, object]) -> int:
    """Queue the email `kind` (a key of templates.TEXTS) to `to` (a normalised address), in
    `language` ('fr' or 'en', 'fr-CH' counts; anything else gives the default, French), filled with
    `context`; returns its id in the cell's outbox. ValueError for an unknown kind or a missing
    value. Links in `context` are credentials (an invitation, a reset): they stay in the outbox
    until the SMTP server has the message."""
    message = render(kind, language, context)
    return int(
        await tx.fetchval(
            "SELECT app.enqueue_email(%s, %s, %s, %s, %s, %s)",
            (to, kind, message.language, message.subject, message.text, message.html),
        )
    )


async def list_messages(tx: Transaction, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The cell's messages without their bodies, newest first: all, 'pending' (incl. being sent) or
    'failed'. An operator's transaction (or a platform administrator's)."""
    return await tx.fetch("SELECT * FROM platform.email_outbox_list(%s, %s)", (state, limit))


async def retry(tx: Transaction, message_id: int | None) -> list[int]:
    """Make message `message_id` (failed, delivered to the log, or waiting for its next attempt)
    due now, with a fresh count of attempts; None: every failed message. Returns the ids."""
    rows = await tx.fetch("SELECT id FROM platform.email_outbox_retry(%s) AS id", (message_id,))
    return [row["id"] for row in rows]
