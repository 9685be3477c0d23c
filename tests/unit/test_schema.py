"""The strict loader: every kind of bad value gets a one-line error naming its key path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from agent.schema import SchemaError, dump, field_meta, load


@dataclass(frozen=True)
class Inner:
    kind: Literal["inner"] = "inner"
    n: int = field(default=1, metadata=field_meta("a count", min=1, max=10))


@dataclass(frozen=True)
class Other:
    kind: Literal["other"] = "other"
    text: str = ""


@dataclass(frozen=True)
class Outer:
    name: str = field(metadata=field_meta("a name", min_len=1, max_len=8))
    ratio: float = 0.5
    flag: bool = False
    pair: tuple[int, int] = (1, 2)
    items: tuple[str, ...] = field(default=(), metadata=field_meta("items", max_len=3))
    mapping: dict[str, float] = field(default_factory=dict)
    child: Inner | Other | None = None


def test_loads_valid_data_and_round_trips() -> None:
    data = {
        "name": "cam",
        "ratio": 2,
        "flag": True,
        "pair": [3, 4],
        "items": ["a", "b"],
        "mapping": {"x": 1.5},
        "child": {"kind": "other", "text": "hi"},
    }
    obj = load(Outer, data)
    assert obj == Outer("cam", 2.0, True, (3, 4), ("a", "b"), {"x": 1.5}, Other(text="hi"))
    assert isinstance(obj.ratio, float)
    assert load(Outer, dump(obj)) == obj


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "name: required key is missing"),
        ({"name": "x", "extra": 1}, "unknown key 'extra'"),
        ({"name": 5}, "name: expected a string, got 5"),
        ({"name": ""}, "name: expected at least 1"),
        ({"name": "123456789"}, "name: expected at most 8"),
        ({"name": "x", "ratio": "high"}, "ratio: expected a number, got 'high'"),
        ({"name": "x", "ratio": float("nan")}, "ratio: expected a finite number"),
        ({"name": "x", "flag": 1}, "flag: expected a boolean, got 1"),
        ({"name": "x", "pair": [1]}, "pair: expected a list of 2 items"),
        ({"name": "x", "pair": [1, True]}, "pair[1]: expected an integer, got True"),
        ({"name": "x", "items": ["a", "b", "c", "d"]}, "items: expected at most 3"),
        ({"name": "x", "mapping": {"k": "v"}}, "mapping.k: expected a number"),
        ({"name": "x", "child": {"kind": "nope"}}, "child.kind: expected one of 'inner', 'other'"),
        ({"name": "x", "child": {"kind": "inner", "n": 11}}, "child.n: expected a value <= 10"),
        ({"name": "x", "child": []}, "child: expected an object with a 'kind' key"),
    ],
)
def test_rejects_bad_values_with_the_key_path(data: object, message: str) -> None:
    with pytest.raises(SchemaError) as info:
        load(Outer, data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_rejects_a_non_mapping_document() -> None:
    with pytest.raises(SchemaError, match="expected an object"):
        load(Outer, ["name"])
