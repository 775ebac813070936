"""The documentation's flag tables (docs/stages.md, docs/lowshot.md) against the parsers: every flag
documented once per table set, with the one default ``--help`` prints ("required" for a required
flag, empty for a switch or a flag without a default)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from engine.options import lowshot_parser, stage1_parser, stage2_parser
from utils.options import displayed_default

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROW = re.compile(r"^\| `(--\w+)` \|\s*([^|]*?)\s*\|")


def flag_tables(page: Path) -> dict[str, dict[str, str]]:
    """``{heading: {flag: default cell}}`` for each table of ``page`` whose header is ``| flag | default |``,
    keyed by the nearest heading above it."""
    tables, heading, current = {}, None, None
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            heading, current = line.lstrip("# ").strip(), None
        elif line.startswith("| flag | default |"):
            current = tables.setdefault(heading, {})
        elif current is not None and line.startswith("|"):
            row = ROW.match(line)
            if row:
                assert row.group(1) not in current, f"{page.name}: {row.group(1)} twice under {heading}"
                current[row.group(1)] = row.group(2).strip().strip("`")
        else:
            current = None if not line.startswith("|") else current
    return tables


def parser_defaults(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {action.option_strings[0]: displayed_default(action) or "" for action in parser._actions
            if action.option_strings and action.option_strings[0] != "-h"}


STAGES = flag_tables(DOCS / "stages.md")
LOWSHOT = flag_tables(DOCS / "lowshot.md")


@pytest.mark.parametrize("parser, tables", [
    (stage1_parser(), [STAGES["Both stages"], STAGES["Stage 1 (`classification.py`)"]]),
    (stage2_parser(), [STAGES["Both stages"], STAGES["Stage 2 (`onlyBasetwoLoss.py`)"]]),
    (lowshot_parser(), [LOWSHOT["Flags of `lowshot_imagenet.py`"]]),
], ids=["classification.py", "onlyBasetwoLoss.py", "lowshot_imagenet.py"])
def test_every_flag_is_documented_with_the_default_help_prints(parser, tables) -> None:
    documented = {}
    for table in tables:
        assert not documented.keys() & table.keys(), "a flag in two tables of one script"
        documented.update(table)
    assert documented == parser_defaults(parser)


def test_help_prints_one_default_per_flag_and_marks_required_flags() -> None:
    for parser in (stage1_parser(), stage2_parser(), lowshot_parser()):
        for action in parser._actions:
            if action.help and action.option_strings[0] != "-h":
                formatted = parser._get_formatter()._get_help_string(action)
                assert formatted.count("(default:") + formatted.count("(required)") <= 1, action.option_strings
                assert formatted.endswith("(required)") == action.required, action.option_strings
                if action.default is None:  # a default resolved later is stated in words, never as None
                    assert "(default: None)" not in formatted, action.option_strings
