"""A report as a list of small blocks, and the two renderers that turn one such list into
`report.md` and into `report.html`, so the two files can never disagree.

Blocks: `Heading`, `Paragraph`, `BulletList` (with an optional lead-in line), `Table` and
`Image` (a captioned figure read from a file). Text is a `str`, or a sequence of pieces in
which `Code` pieces are inline code. The Markdown renderer writes text as given; the HTML
renderer escapes every piece of text and embeds every image as a base64 `data:` URI, so
`report.html` is one self-contained file: inline CSS, no scripts, no external requests (its
Content-Security-Policy refuses any). A new block type needs one function in each of
`_MARKDOWN` and `_HTML`.
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union


class Code(str):
    """Inline code: `x` in Markdown, <code>x</code> in HTML."""


Text = Union[str, Sequence[str]]  # a string, or pieces of which `Code` ones are inline code


@dataclass(frozen=True)
class Heading:
    text: Text
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: Text


@dataclass(frozen=True)
class BulletList:
    items: Sequence[Text]
    intro: Optional[Text] = None  # a line directly above the list, e.g. "Errors (…):"


@dataclass(frozen=True)
class Table:
    header: Sequence[Text]
    rows: Sequence[Sequence[Text]]
    id: Optional[str] = None  # the HTML table's id, e.g. "trials"


@dataclass(frozen=True)
class Image:
    """A figure: `### caption` and a relative link in Markdown, an embedded image in HTML."""

    caption: str
    path: Path


Block = Union[Heading, Paragraph, BulletList, Table, Image]

MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".svg": "image/svg+xml",
}


def format_value(value: Any) -> str:
    """A value as the report writes it in a table or caption: a float to 4 significant digits,
    an en dash for none or a non-finite number, anything else as `str` gives it."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pieces(text: Text) -> Sequence[str]:
    return (text,) if isinstance(text, str) else text


def plain_text(text: Text) -> str:
    return "".join(_pieces(text))


# --- Markdown -------------------------------------------------------------------------------


def _md_inline(text: Text) -> str:
    out = []
    for piece in _pieces(text):
        if isinstance(piece, Code):
            out.append(f"`` {piece} ``" if "`" in piece else f"`{piece}`")
        else:
            out.append(piece)
    return "".join(out)


def _md_cell(text: Text) -> str:
    return _md_inline(text).replace("|", "\\|").replace("\n", " ")


def _md_heading(block: Heading, base: Path) -> list[str]:
    return [f"{'#' * block.level} {_md_inline(block.text)}"]


def _md_paragraph(block: Paragraph, base: Path) -> list[str]:
    return [_md_inline(block.text)]


def _md_list(block: BulletList, base: Path) -> list[str]:
    intro = [_md_inline(block.intro)] if block.intro is not None else []
    return intro + [f"- {_md_inline(item)}" for item in block.items]


def _md_table(block: Table, base: Path) -> list[str]:
    return [
        "| " + " | ".join(_md_cell(cell) for cell in block.header) + " |",
        "|" + "---|" * len(block.header),
        *["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in block.rows],
    ]


def _md_image(block: Image, base: Path) -> list[str]:
    link = Path(os.path.relpath(block.path, base)).as_posix()
    return [f"### {block.caption}", "", f"![{block.caption}]({link})"]


_MARKDOWN: dict[type, Callable[..., list[str]]] = {
    Heading: _md_heading,
    Paragraph: _md_paragraph,
    BulletList: _md_list,
    Table: _md_table,
    Image: _md_image,
}


def to_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown, blocks separated by a blank line; image links relative to `base` (the folder
    the .md file is written to)."""
    return "\n\n".join("\n".join(_MARKDOWN[type(block)](block, Path(base))) for block in blocks) + "\n"


# --- HTML -----------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 75rem;
       margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
code { background: #f2f2f2; padding: 0 .25em; border-radius: 3px; font-size: .92em; }
.table { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; vertical-align: top; }
thead th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.5rem 0; }
figcaption { font-weight: 600; margin-bottom: .4rem; }
img { max-width: 100%; height: auto; }
"""

# Only inline styles and data: images; nothing is fetched and no script runs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _html_inline(text: Text) -> str:
    return "".join(f"<code>{_esc(p)}</code>" if isinstance(p, Code) else _esc(p) for p in _pieces(text))


def _html_heading(block: Heading) -> str:
    level = min(max(block.level, 1), 6)
    return f"<h{level}>{_html_inline(block.text)}</h{level}>"


def _html_paragraph(block: Paragraph) -> str:
    return f"<p>{_html_inline(block.text)}</p>"


def _html_list(block: BulletList) -> str:
    intro = f"<p>{_html_inline(block.intro)}</p>\n" if block.intro is not None else ""
    return intro + "<ul>\n" + "".join(f"<li>{_html_inline(item)}</li>\n" for item in block.items) + "</ul>"


def _html_table(block: Table) -> str:
    table_id = f' id="{_esc(block.id)}"' if block.id else ""
    head = "".join(f"<th>{_html_inline(cell)}</th>" for cell in block.header)
    body = "".join("<tr>" + "".join(f"<td>{_html_inline(cell)}</td>" for cell in row) + "</tr>\n" for row in block.rows)
    return (
        f'<div class="table"><table{table_id}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table></div>'
    )


def data_uri(path: Path) -> str:
    mime = MIME_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


def _html_image(block: Image) -> str:
    return (
        f"<figure>\n<figcaption>{_esc(block.caption)}</figcaption>\n"
        f'<img alt="{_esc(block.caption)}" src="{data_uri(block.path)}">\n</figure>'
    )


_HTML: dict[type, Callable[..., str]] = {
    Heading: _html_heading,
    Paragraph: _html_paragraph,
    BulletList: _html_list,
    Table: _html_table,
    Image: _html_image,
}


def to_html(blocks: Sequence[Block]) -> str:
    """One self-contained HTML page; its title is the first heading's text. All ASCII (other
    characters as references), so it reads the same whatever encoding it is written in."""
    title = next((plain_text(b.text) for b in blocks if isinstance(b, Heading)), "Report")
    body = "\n".join(_HTML[type(block)](block) for block in blocks)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")
