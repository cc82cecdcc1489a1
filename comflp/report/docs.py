"""Figures in README.md and docs/ generated from the results files they come from, so that a
document cannot drift from its results: ``bin/docs.py`` rewrites every generated part,
``bin/docs.py --check`` (and the test suite) fails on any part that differs.

Two markers, each naming its source file (relative to the repository):

- a table: ``<!-- table: SOURCE :: ROWS [:: COLUMNS] -->`` on its own line, then the generated
  lines, then ``<!-- /table -->``; the first markdown table of SOURCE (a ``RESULTS.md``), its
  header and the rows ROWS selects, in SOURCE's order, with every column or the COLUMNS named
  (``,``-separated);
- a figure in a sentence or a table cell:
  ``<!-- value: SOURCE :: ROW :: FIELD [:: FORMAT] -->12.68<!-- /value -->``;
  from a markdown SOURCE the cell of column FIELD in the one row ROW selects, from a JSON
  SOURCE (ROW ``-``) the value at the dotted path FIELD, formatted with FORMAT (a Python
  format spec, e.g. ``.2f``).

ROWS / ROW: ``-`` (every row) or ``column=value; column=value2, column=value`` (``,`` joins
conditions, ``;`` separates the values one column may take).

A markdown SOURCE may name which of its tables: ``path#3`` (the third), ``path#P = 6`` (the first
table after the heading ``P = 6``, of any level).

A third marker lists a package's modules, one line each, with the first sentence of each
module's docstring: ``<!-- modules: comflp -->`` ... ``<!-- /modules -->`` (DESIGN.md's tree).
"""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from comflp.errors import InputError
from comflp.settings import option
from comflp.utils import atomic_write_text

MODULES = re.compile(
    r"^<!-- modules: (?P<spec>\S+) -->\n(?P<body>.*?)^<!-- /modules -->$", re.M | re.S
)
TABLE = re.compile(r"^<!-- table: (?P<spec>.+?) -->\n(?P<body>.*?)^<!-- /table -->$", re.M | re.S)
VALUE = re.compile(r"<!-- value: (?P<spec>.+?) -->(?P<body>.*?)<!-- /value -->", re.S)
DOCUMENTS = ("README.md", "docs/*.md", "docs/results/**/*.md", "egs/*/README.md")


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    lines: list[str]  # header, separator, then one line per row


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(lines: list[str]) -> list[Table]:
    """Every markdown table of ``lines``, in order."""
    out = []
    for i, line in enumerate(lines[:-1]):
        starts = i == 0 or not lines[i - 1].startswith("|")
        if starts and line.startswith("|") and re.match(r"^\|[\s\-:|]+\|$", lines[i + 1]):
            body = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                body.append(row)
            out.append(Table(_cells(line), [_cells(r) for r in body], [line, lines[i + 1], *body]))
    return out


def first_table(path: Path, which: str = "") -> Table:
    """The first markdown table of ``path``, or the one ``which`` names: ``N`` (the Nth) or a
    heading's text (the first table after it)."""
    lines = path.read_text().splitlines()
    if which and not which.isdigit():
        heads = [i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(which)}", line)]
        if not heads:
            raise InputError(f"{path}: no heading {which!r}")
        lines = lines[heads[0] :]
    found = tables(lines)
    index = int(which) - 1 if which.isdigit() else 0
    if not 0 <= index < len(found):
        raise InputError(f"{path}: no markdown table{f' {which}' if which else ''}")
    return found[index]


def _select(table: Table, rows: str, where: str) -> list[int]:
    """Indices of the rows matching ``rows`` (see the module docstring)."""
    if rows.strip() == "-":
        return list(range(len(table.rows)))
    conditions = []
    for part in rows.split(","):
        column, _, values = part.partition("=")
        column = column.strip()
        if column not in table.header:
            raise InputError(f"{where}: no column {column!r} (columns: {', '.join(table.header)})")
        conditions.append((table.header.index(column), {v.strip() for v in values.split(";")}))
    return [i for i, r in enumerate(table.rows) if all(r[c] in vs for c, vs in conditions)]


def _spec(spec: str, n: int, where: str) -> list[str]:
    parts = [p.strip() for p in spec.split("::")]  # not '|': markers sit in table cells too
    if not n <= len(parts) <= n + 1:
        raise InputError(f"{where}: marker {spec!r}: expected {n} parts separated by '::'")
    return parts


def render_table(root: Path, spec: str, where: str) -> str:
    parts = _spec(spec, 2, where)
    source, rows = parts[:2]
    table = _table(root, source, where)
    keep = _select(table, rows, where)
    if not keep:
        raise InputError(f"{where}: no row of {source} matches {rows!r}")
    if len(parts) == 2:
        return "\n".join(table.lines[:2] + [table.lines[2 + i] for i in keep]) + "\n"
    names = [c.strip() for c in parts[2].split(",")]
    missing = [c for c in names if c not in table.header]
    if missing:
        raise InputError(f"{where}: no column {', '.join(map(repr, missing))} in {source}")
    cols = [table.header.index(c) for c in names]
    align = _cells(table.lines[1])
    lines = [names, [align[c] for c in cols], *([table.rows[i][c] for c in cols] for i in keep)]
    return "".join(f"| {' | '.join(cells)} |\n" for cells in lines)


def _table(root: Path, source: str, where: str) -> Table:
    path, _, which = source.partition("#")
    return first_table(_source(root, path, where), which.strip())


def render_value(root: Path, spec: str, where: str) -> str:
    parts = _spec(spec, 3, where)
    source, row, field = parts[:3]
    fmt = parts[3] if len(parts) == 4 else ""
    path = _source(root, source.partition("#")[0], where)
    if path.suffix == ".json":
        value = json.loads(path.read_text())
        for key in field.split("."):
            try:
                value = value[int(key)] if isinstance(value, list) else value[key]
            except (KeyError, IndexError, ValueError, TypeError):
                raise InputError(f"{where}: {source} has no {field!r}") from None
        return format(value, fmt)
    table = _table(root, source, where)
    keep = _select(table, row, where)
    if len(keep) != 1 or field not in table.header:
        raise InputError(
            f"{where}: {row!r} selects {len(keep)} rows of {source} (need 1), "
            f"column {field!r} {'found' if field in table.header else 'missing'}"
        )
    return table.rows[keep[0]][table.header.index(field)]


def first_sentence(path: Path) -> str:
    """The first sentence of a module's docstring, on one line ("" without one)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    match = re.search(r"(?<!\bet al)(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", text)
    return text[: match.start() + 1] if match else text


def render_modules(root: Path, package: str, where: str) -> str:
    """One line per module of ``package`` (a directory under ``root``), packages first."""
    base = root / package
    if not (base / "__init__.py").is_file():
        raise InputError(f"{where}: {package} is not a package")
    lines = []
    for path in sorted(
        base.rglob("*.py"), key=lambda p: (p.parent.relative_to(base).parts, p.name)
    ):
        if path.name == "__init__.py" and not first_sentence(path):
            continue
        name = path.parent if path.name == "__init__.py" else path
        lines.append(f"- `{name.relative_to(root)}`: {first_sentence(path) or '(no docstring)'}")
    return "\n".join(lines) + "\n"


def _source(root: Path, source: str, where: str) -> Path:
    path = root / source
    if not path.is_file():
        raise InputError(f"{where}: source {source} not found")
    return path


def regenerate(root: Path, path: Path) -> str:
    """``path``'s text with every generated part rebuilt from its source."""
    name = path.relative_to(root)

    def where(text: str, pos: int) -> str:
        return f"{name}:{text.count(chr(10), 0, pos) + 1}"

    text = path.read_text()
    text = MODULES.sub(
        lambda m: (
            f"<!-- modules: {m['spec']} -->\n"
            f"{render_modules(root, m['spec'], where(text, m.start()))}<!-- /modules -->"
        ),
        text,
    )
    text = TABLE.sub(
        lambda m: (
            f"<!-- table: {m['spec']} -->\n"
            f"{render_table(root, m['spec'], where(text, m.start()))}<!-- /table -->"
        ),
        text,
    )
    return VALUE.sub(
        lambda m: (
            f"<!-- value: {m['spec']} -->"
            f"{render_value(root, m['spec'], where(text, m.start()))}<!-- /value -->"
        ),
        text,
    )


def documents(root: Path) -> list[Path]:
    """The documents whose generated parts are kept current."""
    found = {p for pattern in DOCUMENTS for p in root.glob(pattern)}
    return sorted(p for p in found if p.is_file())


def stale(root: Path) -> list[str]:
    """The documents whose generated parts differ from their sources."""
    return [
        str(p.relative_to(root)) for p in documents(root) if regenerate(root, p) != p.read_text()
    ]


@dataclass(kw_only=True)
class DocsSettings:
    """Rewrite (or check) the generated parts of README.md and docs/ from the results files."""

    check: bool = option(False, "only check: exit 1 naming each document that differs")
    root: Path = option(Path("."), "the repository")


def docs(s: DocsSettings) -> None:
    changed = stale(s.root)
    if s.check:
        if changed:
            raise InputError(
                f"generated figures differ from their results files in {', '.join(changed)} "
                "(run bin/docs.py)"
            )
        logging.info(f"{len(documents(s.root))} documents: every generated part is current")
        return
    for name in changed:
        atomic_write_text(s.root / name, regenerate(s.root, s.root / name))
        logging.info(f"{name}: generated parts rewritten")
