"""The README states what the code does: its metric table is the declared milestone row."""

from diffusion_lib.milestone import markdown_table

from conftest import REPO


def test_the_readme_metric_table_is_the_declared_milestone_row():
    assert markdown_table() in (REPO / "README.md").read_text()
