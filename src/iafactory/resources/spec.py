"""What a record type is: its table, id type and schemas. Declared next to each domain's schemas."""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from pydantic import BaseModel


@dataclass(frozen=True)
class Resource:
    name: str  # URL segment(s) and operation-id stem, e.g. "crm/leads"
    table: str  # PostgreSQL table
    noun: str  # "lead", for messages and summaries
    tag: str  # OpenAPI tag
    create: type[BaseModel]
    update: type[BaseModel]
    read: type[BaseModel]
    id_type: type = UUID  # int for the tables that existed before tenancy
    json_columns: frozenset[str] = field(default_factory=frozenset)
    plural: str = ""  # defaults to noun + "s"
    # Answers particular to this record type that no schema can state (a referenced record must
    # exist, credits must suffice), documented on its create route, or on create and update.
    create_responses: tuple[tuple[int, str], ...] = ()
    write_responses: tuple[tuple[int, str], ...] = ()
    # A NOTIFY channel that a create or an update signals on commit (work for a background worker).
    wakes: str | None = None

    @property
    def columns(self) -> list[str]:
        return list(self.read.model_fields)

    @property
    def nouns(self) -> str:
        return self.plural or f"{self.noun}s"

    @property
    def slug(self) -> str:
        return self.name.replace("/", "_").replace("-", "_")

    @property
    def operation_noun(self) -> str:
        """The noun in operation ids, as a person would name the client methods: create_lead,
        list_leads, get_pme_analysis."""
        return _identifier(self.noun)

    @property
    def operation_nouns(self) -> str:
        return _identifier(self.nouns)


def _identifier(words: str) -> str:
    return "_".join(words.lower().replace("-", " ").split())
