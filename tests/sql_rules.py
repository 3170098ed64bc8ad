"""The SQL rules of a schema distributed by tenant (Citus), checked on SQL text.

Used on two kinds of text: the bodies of the database's own functions (read from pg_proc) and the
statements the application sends (captured while the API flows run). Each rule is one a
distributed planner enforces:

* every statement on a tenant table names its tenant, `<alias>.tenant_id = <value>` (`id = ...`
  on tenants) for each tenant table it reads or writes: the router sends it to that tenant's
  shard. A row policy or `tenant_id = app.current_tenant_id()` alone makes it go to every shard;
* an INSERT into a tenant table names tenant_id among its columns and takes VALUES (INSERT ...
  SELECT into a table with row security is refused);
* no non-IMMUTABLE function inside CASE or COALESCE in the SET list of an UPDATE (refused);
* no function of this project called in a LATERAL join over tenant rows (refused).

A regular-expression reading, not a parser: it understands the SQL this project writes (tables
named after FROM / JOIN / UPDATE / INTO, optionally `public.`-qualified, with an optional alias).
Cases it cannot see through fail loudly rather than pass, and the tests list their exceptions with
a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KEYWORDS = frozenset(
    [
        "where",
        "set",
        "on",
        "using",
        "join",
        "left",
        "right",
        "inner",
        "outer",
        "full",
        "cross",
        "natural",
        "lateral",
        "values",
        "select",
        "as",
        "from",
        "group",
        "order",
        "limit",
        "offset",
        "returning",
        "for",
        "union",
        "except",
        "intersect",
        "having",
        "window",
        "and",
        "or",
        "not",
        "into",
        "default",
        "only",
        "with",
        "do",
        "conflict",
        "nothing",
        "when",
        "then",
        "else",
        "end",
        "case",
        "is",
        "null",
        "skip",
        "locked",
        "nowait",
        "of",
    ]
)

_TABLE_REF = re.compile(
    r"\b(?P<kw>from|join|update|into)\s+(?:only\s+)?(?:\"?public\"?\.)?\"?(?P<name>[a-z_][a-z0-9_]*)\"?"
    rf"(?:\s+(?:as\s+)?(?P<alias>(?!(?:{'|'.join(sorted(KEYWORDS))})\b)[a-z_][a-z0-9_]*))?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Finding:
    rule: str
    statement: str

    def __str__(self) -> str:
        text = " ".join(self.statement.split())
        return f"{self.rule}: {text[:300]}"


def blank_literals(sql: str) -> str:
    """`sql` with comments removed and string literals (standard, E'', dollar-quoted) emptied, so
    that a keyword or a semicolon inside a string is not read as SQL."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == "'":
            escaped = i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            j = i + 1
            while j < n:
                if escaped and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            out.append("''")
            i = j + 1
        elif c == "$" and (m := re.match(r"\$([a-zA-Z_][a-zA-Z0-9_]*)?\$", sql[i:])):
            tag = m.group(0)
            end = sql.find(tag, i + len(tag))
            out.append("''")
            i = n if end < 0 else end + len(tag)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def split_statements(sql: str) -> list[str]:
    """Top-level `;`-separated pieces of `sql` (literals already blanked)."""
    pieces, depth, start = [], 0, 0
    for i, c in enumerate(sql):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == ";" and depth <= 0:
            pieces.append(sql[start:i])
            start = i + 1
    pieces.append(sql[start:])
    return [p.strip() for p in pieces if p.strip()]


def _balanced(text: str, open_at: int) -> str:
    """The text from `open_at` (an opening parenthesis) to its closing one, inclusive."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[open_at : i + 1]
    return text[open_at:]


# What the key is compared with. A value the planner knows when it plans anchors the table: a
# parameter ($1, %s), a literal, a variable, NEW.tenant_id. Another tenant table's key (a join on
# the key) ties the two tables together, so one anchor routes both. A function call such as
# app.current_tenant_id() (Citus does not route on a STABLE function) or a subquery anchors nothing.
_VALUE = r"[\w.$%:']+"


def _routed(statement: str, refs: list[tuple[str, str, str]]) -> set[str]:
    """The aliases among `refs` whose key is anchored to a value, directly or through joins."""
    keys = {alias: ("id" if table == "tenants" else "tenant_id") for _, table, alias in refs}
    single = len(keys) == 1
    anchored: set[str] = set()
    edges: set[tuple[str, str]] = set()
    for _, table, alias in refs:
        column = keys[alias]
        sides = [rf"\b{re.escape(alias)}\.{column}\b"]
        if single or alias == table:
            sides.append(rf"(?<![.\w]){column}\b")
        operands = []
        for side in sides:
            operands += [
                (m.group("operand"), m.group("call"))
                for m in re.finditer(rf"{side}\s*=\s*(?P<operand>{_VALUE})(?P<call>\s*\()?", statement, re.IGNORECASE)
            ]
            operands += [
                (m.group("operand"), None)
                for m in re.finditer(rf"(?<![\w.$%:'])(?P<operand>{_VALUE})\s*=\s*{side}", statement, re.IGNORECASE)
            ]
        for operand, call in operands:
            operand = operand.lower()
            if call or operand in ("any", "all", "select") or operand.endswith(")"):
                continue
            other = operand.split(".")[0] if "." in operand and not operand.startswith("'") else None
            if other in keys and other != alias:
                if operand == f"{other}.{keys[other]}":
                    edges.add((alias, other))
                continue
            anchored.add(alias)
    changed = True
    while changed:
        changed = False
        for a, b in edges:
            if (a in anchored) != (b in anchored):
                anchored |= {a, b}
                changed = True
    return anchored


def table_references(statement: str, tables: set[str]) -> list[tuple[str, str, str]]:
    """(kind, table, alias) for each reference to one of `tables`; kind is insert, update,
    delete or read."""
    refs = []
    for m in _TABLE_REF.finditer(statement):
        name = m.group("name").lower()
        if name not in tables:
            continue
        kw = m.group("kw").lower()
        alias = (m.group("alias") or "").lower()
        if not alias or alias in KEYWORDS:
            alias = name
        before = statement[: m.start()].rstrip().lower()
        if kw == "into":
            kind = "insert" if before.endswith("insert") else "read"  # SELECT ... INTO variable
        elif kw == "update":
            if before.endswith(("for", "do")):
                continue  # FOR UPDATE, ON CONFLICT DO UPDATE
            kind = "update"
        elif kw == "from" and before.endswith("delete"):
            kind = "delete"
        else:
            kind = "read"
        refs.append((kind, name, alias))
    return refs


def check_statement(
    statement: str, tenant_tables: set[str], non_immutable: set[str], cross_tenant_reads: set[str] = frozenset()
) -> list[Finding]:
    """Findings for one statement (literals blanked). `tenant_tables` includes "tenants" (keyed
    on id); `cross_tenant_reads` are tables this statement may read without naming a tenant."""
    findings: list[Finding] = []
    refs = table_references(statement, tenant_tables)
    routed = _routed(statement, [r for r in refs if r[0] != "insert"])
    for kind, table, alias in refs:
        key = "id" if table == "tenants" else "tenant_id"
        if kind == "insert":
            m = re.search(
                rf"\binsert\s+into\s+(?:\"?public\"?\.)?\"?{table}\"?(?:\s+as\s+\w+)?\s*(\()?", statement, re.IGNORECASE
            )
            if m is None or m.group(1) is None:
                findings.append(Finding(f"INSERT INTO {table} without a column list naming {key}", statement))
                continue
            columns = _balanced(statement, m.end(1) - 1)
            rest = statement[m.end(1) - 1 + len(columns) :].lstrip().lower()
            if not re.search(rf"(?<![\w.]){key}(?![\w])", columns, re.IGNORECASE):
                findings.append(Finding(f"INSERT INTO {table} does not name {key}", statement))
            if not rest.startswith(("values", "default values")):
                findings.append(
                    Finding(f"INSERT INTO {table} ... SELECT (a table with row security takes VALUES)", statement)
                )
            continue
        if kind == "read" and table in cross_tenant_reads:
            continue
        if alias not in routed:
            findings.append(Finding(f"{kind} of {table} ({alias}) without {alias}.{key} = <value>", statement))
        if kind == "update":
            findings.extend(_volatile_in_case_or_coalesce(statement, table, non_immutable))
    if refs and (m := re.search(r"\blateral\s+((?:app|platform|internal)\.\w+)\s*\(", statement, re.IGNORECASE)):
        findings.append(
            Finding(
                f"{m.group(1)}() in a LATERAL join over tenant rows (call it once per row in a loop instead)", statement
            )
        )
    if re.search(r"\bon\s+conflict\b.*\bdo\s+update\b", statement, re.IGNORECASE | re.DOTALL) and refs:
        findings.extend(_volatile_in_case_or_coalesce(statement, refs[0][1], non_immutable, on_conflict=True))
    return findings


_SET_CLAUSE = re.compile(r"\bset\b(?P<body>.*?)(?=\bwhere\b|\bfrom\b|\breturning\b|$)", re.IGNORECASE | re.DOTALL)
_CONSTANT_CALLS = ("current_timestamp", "current_date", "current_time", "localtimestamp", "localtime")


def _volatile_in_case_or_coalesce(
    statement: str, table: str, non_immutable: set[str], on_conflict: bool = False
) -> list[Finding]:
    text = statement
    if on_conflict:
        text = re.split(r"\bdo\s+update\b", statement, maxsplit=1, flags=re.IGNORECASE)[-1]
    m = _SET_CLAUSE.search(text)
    if m is None:
        return []
    body = m.group("body")
    regions = []
    for c in re.finditer(r"\b(?:coalesce|nullif|greatest|least)\s*\(", body, re.IGNORECASE):
        regions.append(_balanced(body, c.end() - 1))
    regions += re.findall(r"\bcase\b.*?\bend\b", body, re.IGNORECASE | re.DOTALL)
    found = []
    for region in regions:
        calls = {f.lower() for f in re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", region, re.IGNORECASE)}
        bad = sorted((calls & non_immutable) | {k for k in _CONSTANT_CALLS if re.search(rf"\b{k}\b", region, re.I)})
        if bad:
            found.append(Finding(f"UPDATE of {table}: non-IMMUTABLE {', '.join(bad)} inside CASE/COALESCE", statement))
    return found


def check_sql(
    text: str, tenant_tables: set[str], non_immutable: set[str], cross_tenant_reads: set[str] = frozenset()
) -> list[Finding]:
    """Every statement of `text` (a function body or a message the application sent)."""
    findings = []
    for statement in split_statements(blank_literals(text)):
        prepared = re.match(r"prepare\s+\w+\s*(?:\([^)]*\))?\s+as\s+", statement, re.IGNORECASE)
        if prepared:
            statement = statement[prepared.end() :]
        findings.extend(check_statement(statement, tenant_tables, non_immutable, cross_tenant_reads))
    return findings
