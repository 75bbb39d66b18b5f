"""The round summary every member of a completed round reads (``r<n>/done``) and the
per-node seat keys: what the completer writes parses back, a legacy full record still
parses, and garbage is a :class:`CorruptKey` (a protocol error), never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_runner.rendezvous.records import CorruptKey, RoundSummary, done_summary, seat_of


def _summary(**changes: Any) -> RoundSummary:
    fields: dict[str, Any] = {
        "attempt": "ab12cd34",
        "size": 5,
        "roles": (("trainer", 8, 4), ("eval", 1, 1)),
        "version": 1234,
        "candidates": (("node-0", "10.0.0.1", 29401), ("node-4", "10.0.0.5", 29405)),
    }
    fields.update(changes)
    return RoundSummary(**fields)


@pytest.mark.parametrize(
    "summary",
    [
        _summary(),
        _summary(candidates=()),  # no member can host the store (no failover)
        _summary(size=1, roles=(("default", 0, 1),), version=0, candidates=()),
    ],
    ids=["candidates", "no-candidates", "one-node"],
)
def test_a_summary_round_trips(summary: RoundSummary) -> None:
    text = summary.to_json()
    assert done_summary(3, text) == summary
    assert done_summary(3, text).record is None  # seats, not a record inside
    assert " " not in text  # compact: N members read it


def test_a_summary_stays_small_whatever_the_number_of_nodes() -> None:
    record = [
        [f"node-{i:04d}", "default", 8, f"10.0.{i // 256}.{i % 256}", 29400] for i in range(1024)
    ]
    summary = RoundSummary("a1", 1024, RoundSummary.runs(record), 7)
    assert summary.roles == (("default", 8, 1024),)
    assert len(summary.to_json()) < 200
    assert done_summary(0, summary.to_json()).size == 1024


def test_runs_group_alike_nodes_in_order() -> None:
    record = [
        ["a", "trainer", 8, "10.0.0.1", 1],
        ["b", "trainer", 8, "10.0.0.2", 2],
        ["c", "trainer", 4, "10.0.0.3", 3],  # other workers: a new run
        ["d", "eval", 4, "10.0.0.4", 4],  # other role: a new run
        ["e", "trainer", 8, "10.0.0.5", 5],  # like the first ones, but not next to them
        ["f", "trainer", 8, "10.0.0.6", 6],
    ]
    assert RoundSummary.runs(record) == (
        ("trainer", 8, 2),
        ("trainer", 4, 1),
        ("eval", 4, 1),
        ("trainer", 8, 2),
    )
    assert RoundSummary.runs([]) == ()


def test_a_legacy_full_record_is_accepted() -> None:
    legacy = [["n0", "trainer", 2, "10.0.0.1", 29401], ["n1", "trainer", 2], ["n2", "eval", 1]]
    summary = done_summary(4, json.dumps(legacy))
    assert summary.size == 3
    assert summary.roles == (("trainer", 2, 2), ("eval", 1, 1))
    assert summary.record == tuple(tuple(m) for m in legacy)
    assert (summary.attempt, summary.version, summary.candidates) == ("", 0, ())


@pytest.mark.parametrize(
    "value",
    [
        "",
        "null",
        "[]",  # a legacy record of no node
        "[[1, 2, 3]]",
        "{}",
        '"text"',
        "42",
        "not json",
        _summary(size=6).to_json(),  # the runs do not add up to the size
        _summary(attempt="a/b").to_json(),  # would name other keys
        _summary(attempt="").to_json(),
        _summary(size=0, roles=()).to_json(),
        _summary(version=-1).to_json(),
        _summary(roles=(("t", 8, 0), ("e", 1, 5))).to_json(),  # a run of no node
        _summary(roles=(("t", -1, 5),)).to_json(),
        _summary(candidates=(("n", "10.0.0.1", 0),)).to_json(),
        _summary(candidates=(("n", "10.0.0.1", 65536),)).to_json(),
        _summary(candidates=(("n", None, 29400),)).to_json(),
        json.dumps({"attempt": "a", "size": True, "version": 0, "roles": [["t", 1, 1]]}),
        json.dumps({"attempt": "a", "size": 1, "version": 0, "roles": [["t", 1]]}),
        json.dumps({"attempt": "a", "size": 1, "version": 0, "roles": {"t": 1}}),
        json.dumps({"attempt": "a", "size": 1, "roles": [["t", 1, 1]]}),  # no version
        json.dumps(
            {"attempt": "a", "size": 1, "version": 0, "roles": [["t", 1, 1]], "candidates": 5}
        ),
        "[" * 5000 + "]" * 5000,
    ],
)
def test_garbage_in_done_is_a_corrupt_key(value: str) -> None:
    with pytest.raises(CorruptKey, match=r"r7/done"):
        done_summary(7, value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6)
    ),
    max_leaves=20,
)
# Summaries with a field or two wrong: closer to what a bug or another version writes.
_near = st.fixed_dictionaries(
    {
        "attempt": st.text(max_size=6) | _json,
        "size": st.integers(-2, 6) | _json,
        "version": st.integers(-2, 6) | _json,
        "roles": st.lists(st.tuples(st.text(max_size=3), st.integers(-1, 3), st.integers(-1, 3)))
        | _json,
    },
    optional={
        "candidates": st.lists(st.lists(st.text(max_size=3) | st.integers(-1, 70000), max_size=4))
        | _json
    },
)


def _parses_or_corrupt(value: str) -> None:
    try:
        summary = done_summary(0, value)
    except CorruptKey:
        return
    assert summary.size > 0
    assert sum(count for _, _, count in summary.roles) == summary.size


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_any_text_in_done_parses_or_is_a_corrupt_key(value: str) -> None:
    _parses_or_corrupt(value)


@settings(max_examples=400, deadline=None)
@given(_json | _near)
def test_any_json_in_done_parses_or_is_a_corrupt_key(value: Any) -> None:
    _parses_or_corrupt(json.dumps(value))


@pytest.mark.parametrize(
    ("value", "size", "rank"),
    [
        ("0", 1, 0),
        ("3", 4, 3),
        ("4", 4, None),  # beyond the round
        ("10", 4, None),
        (None, 4, None),  # no seat: not a member
        ("", 4, None),
        ("-1", 4, None),
        ("+1", 4, None),
        ("1.0", 4, None),
        (" 1", 4, None),
        ("1\n", 4, None),
        ("one", 4, None),
    ],
)
def test_a_seat_is_digits_below_the_size(value: str | None, size: int, rank: int | None) -> None:
    assert seat_of(value, size) == rank


@pytest.mark.parametrize("value", ["\u00b2", "\u0661", "\uff13"])
def test_a_seat_of_other_digits_is_not_one(value: str) -> None:
    assert seat_of(value, 4) is None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127)), st.integers(1, 50))
def test_any_ascii_text_in_a_seat_is_a_rank_below_the_size_or_none(value: str, size: int) -> None:
    rank = seat_of(value, size)
    assert rank is None or (0 <= rank < size and str(rank) == value.lstrip("0").rjust(1, "0"))
