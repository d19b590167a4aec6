"""The README and docs/ state what the code does: the README's first screen sets up and runs the
main job and links every docs page, the metric table is the declared milestone row, and the
configuration table is the config schema's keys, defaults and choices."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from diffusion_lib.config import RunConfig
from diffusion_lib.milestone import markdown_table

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
FIRST_SCREEN_LINES = 40
README_MAX_LINES = 160


def test_the_metric_table_is_the_declared_milestone_row():
    assert markdown_table() in (DOCS / "files.md").read_text()


# ---- the configuration table ----------------------------------------------------------------


def configuration_rows() -> list[tuple[list[str], list[str], str]]:
    """The rows of docs/configuration.md's table: the keys a row names (in its first cell), the
    defaults it shows for them (its second cell, split at ", ") and the whole row's text."""
    text = (DOCS / "configuration.md").read_text()
    table = text[text.index("| key | default | meaning |") :].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:  # under the header and the |---| line
        keys_cell, defaults_cell = (cell.strip() for cell in line.split(" | ")[:2])
        rows.append((re.findall(r"`([^`]+)`", keys_cell), defaults_cell.split(", "), line))
    return rows


def schema_choices() -> dict[str, tuple[Any, ...]]:
    """{"data.name": ("cifar10", "shapes", "folder"), ...}: the keys whose type is a Literal."""
    choices = {}
    for section, section_type in typing.get_type_hints(RunConfig).items():
        for key, annotation in typing.get_type_hints(section_type).items():
            if typing.get_origin(annotation) is Literal:
                choices[f"{section}.{key}"] = typing.get_args(annotation)
    return choices


def shown_value(cell: str) -> Any:
    """A default as the table shows it: `all` and `none` are null, the rest reads as YAML, and a
    number YAML leaves as text (`1e-4`) as a number."""
    text = cell.strip("`")
    if text in ("all", "none"):
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def test_the_configuration_table_names_every_key_of_the_schema_once():
    named = [key for keys, _, _ in configuration_rows() for key in keys]
    schema = list(RunConfig().flat())
    assert sorted(named) == sorted(schema), (
        f"not in the table: {sorted(set(schema) - set(named))}; not in the schema: {sorted(set(named) - set(schema))}"
    )
    assert len(named) == len(set(named)), (
        f"named in more than one row: {sorted({k for k in named if named.count(k) > 1})}"
    )


def test_the_configuration_table_shows_each_key_s_default():
    defaults = RunConfig().flat()
    wrong = []
    for keys, shown, line in configuration_rows():
        assert len(shown) == len(keys), f"{len(keys)} keys but {len(shown)} defaults in: {line}"
        for key, cell in zip(keys, shown):
            if key not in defaults:
                continue  # an unknown key: the test above names it
            value = shown_value(cell)
            same_kind = isinstance(value, bool) == isinstance(defaults[key], bool)
            if not (same_kind and value == defaults[key]):
                wrong.append(f"{key}: the table shows {cell}, the schema's default is {defaults[key]!r}")
    assert not wrong, "\n".join(wrong)


def test_the_configuration_table_names_every_choice_of_a_key_with_fixed_choices():
    row_of = {key: line for keys, _, line in configuration_rows() for key in keys}
    for key, choices in schema_choices().items():
        unnamed = [choice for choice in choices if f"`{choice}`" not in row_of[key]]
        assert not unnamed, f"{key}: the table's row does not name {unnamed}"


# ---- the README and its links ---------------------------------------------------------------


def bash_block(text: str, heading: str) -> list[str]:
    """The lines of the first ```bash block after `heading`."""
    block = text[text.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def test_the_readme_first_screen_sets_up_and_runs_the_main_job():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"the README has {len(lines)} lines; the reference belongs in docs/"
    first_screen = "\n".join(lines[:FIRST_SCREEN_LINES])
    install, test = bash_block(first_screen, "## Set up")
    ci = (REPO / ".ci" / "run").read_text().splitlines()  # CI installs and tests as the README says
    assert install.replace("pip install ", "pip install -q ") in ci and test in ci, (install, test)
    main_job = bash_block(first_screen, "## The main job")
    assert main_job[0].startswith("export SWEEP_FID_WEIGHTS=") and main_job[-1] == "sweep run search_spaces/smoke.yaml"


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces to -."""
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)  # no code blocks
    headings = re.findall(r"^#+ (.+)$", prose, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def relative_links(page: Path) -> list[str]:
    return [link for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()) if "://" not in link]


def test_the_readme_links_every_docs_page():
    linked = {(REPO / link.split("#")[0]).resolve() for link in relative_links(README)}
    unlinked = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_every_link_of_the_readme_and_docs_reaches_its_page_and_heading():
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for link in relative_links(page):
            target, _, anchor = link.partition("#")
            target_page = (page.parent / target).resolve() if target else page
            assert target_page.is_file(), f"{page.name}: link {link} leads to no file"
            if anchor:
                assert anchor in heading_anchors(target_page), f"{page.name}: link {link} leads to no heading"
