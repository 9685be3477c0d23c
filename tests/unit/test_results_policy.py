"""Which results are published under each [results] policy."""

from __future__ import annotations

from typing import Any

import pytest

from agent.daemon.config import ResultsConfig
from agent.daemon.results import ResultsPolicy, result_kind, result_score, result_summary


def cls(label: str, score: float = 0.9) -> dict[str, Any]:
    return {"top": [{"index": int(label), "label": label, "score": score}]}


def det(*scores: float) -> dict[str, Any]:
    return {"detections": [{"box": [0, 0, 1, 1], "score": s, "label": "face"} for s in scores]}


def anomaly(flag: bool, score: float = 0.3) -> dict[str, Any]:
    return {"score": score, "anomaly": flag}


def decisions(config: ResultsConfig, items: list[tuple[dict[str, Any], float]]) -> list[bool]:
    policy = ResultsPolicy(config)
    return [policy.should_publish(payload, ts) for payload, ts in items]


def test_every_publishes_everything() -> None:
    items = [(cls("3"), 0.0)] * 5
    assert decisions(ResultsConfig(policy="every"), items) == [True] * 5


@pytest.mark.parametrize(
    ("payloads", "expected"),
    [
        ([cls("3"), cls("3", 0.5), cls("4"), cls("4"), cls("3")], [True, False, True, False, True]),
        ([det(0.9), det(0.8), det(0.9, 0.7), det()], [True, False, True, True]),
        (
            [anomaly(False), anomaly(False, 0.4), anomaly(True), anomaly(True)],
            [True, False, True, False],
        ),
    ],
)
def test_on_change_compares_the_summary(
    payloads: list[dict[str, Any]], expected: list[bool]
) -> None:
    items = [(p, float(i)) for i, p in enumerate(payloads)]
    assert decisions(ResultsConfig(policy="on_change"), items) == expected


def test_on_change_always_publishes_raw_outputs() -> None:
    raw = {"outputs": [{"name": "y", "shape": [1], "data": [1.0], "truncated": False}]}
    assert decisions(ResultsConfig(policy="on_change"), [(raw, 0.0), (raw, 1.0)]) == [True, True]


def test_interval_publishes_at_most_once_per_interval() -> None:
    times = [0.0, 0.4, 0.99, 1.0, 1.5, 2.2, 2.3]
    items = [(cls("1"), t) for t in times]
    assert decisions(ResultsConfig(policy="interval", interval_s=1.0), items) == [
        True,
        False,
        False,
        True,
        False,
        True,
        False,
    ]


def test_above_score_uses_the_best_score() -> None:
    items = [
        (cls("1", 0.49), 0.0),
        (cls("1", 0.5), 1.0),
        (det(0.2, 0.7), 2.0),
        (det(), 3.0),
        (anomaly(True, 0.8), 4.0),
    ]
    assert decisions(ResultsConfig(policy="above_score", min_score=0.5), items) == [
        False,
        True,
        True,
        False,
        True,
    ]


def test_reconfigure_starts_the_change_memory_over() -> None:
    policy = ResultsPolicy(ResultsConfig(policy="on_change"))
    assert policy.should_publish(cls("3"), 0)
    assert not policy.should_publish(cls("3"), 1)
    policy.reconfigure(ResultsConfig(policy="on_change"))
    assert policy.should_publish(cls("3"), 2)


def test_payload_helpers() -> None:
    assert [result_kind(p) for p in (cls("1"), det(), anomaly(True))] == [
        "classification",
        "detection",
        "anomaly",
    ]
    assert result_summary(cls("7")) == "7"
    assert result_summary(det(0.1, 0.2)) == 2
    assert result_score(det(0.1, 0.6)) == 0.6
    assert result_score({"top": []}) == 0.0
