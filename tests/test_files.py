"""utils.files: JSON written atomically is strict JSON (no NaN), and a CSV round-trips its cells."""
from __future__ import annotations

import json
import math

from utils.files import read_csv, write_csv, write_json


def test_json_has_no_nan_and_keeps_finite_numbers(tmp_path) -> None:
    path = tmp_path / "out" / "summary.json"
    write_json(path, {"mean": 1.5, "half": math.nan, "values": [1.0, math.inf, (2, -math.inf)],
                      "nested": {"std": math.nan, "n": 1}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert loaded == {"mean": 1.5, "half": None, "values": [1.0, None, [2, None]], "nested": {"std": None, "n": 1}}
    assert not list(path.parent.glob(".*.tmp"))


def test_csv_writes_the_named_fields_and_reads_them_back(tmp_path) -> None:
    path = tmp_path / "rows.csv"
    write_csv(path, [{"a": 1, "b": "x", "c": "ignored"}, {"a": 2.5, "b": "y"}], ["a", "b"])
    assert read_csv(path) == [{"a": "1", "b": "x"}, {"a": "2.5", "b": "y"}]
