"""The metadata filter's value codes against a brute-force filter over the rows' metadata."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.metadata_index import NO_VALUE, KeyColumn, MetadataIndex, canonical_json


def brute_force(metadata: dict[int, dict], flt: dict[str, object]) -> list[int]:
    return sorted(
        row
        for row, meta in metadata.items()
        if all(
            key in meta
            and not isinstance(meta[key], dict | list)
            and canonical_json(meta[key]) == canonical_json(value)
            for key, value in flt.items()
        )
    )


def test_random_adds_replaces_and_removes_filter_like_brute_force():
    rng = np.random.default_rng(0)
    n_rows = 300
    index = MetadataIndex(capacity=64)
    metadata: dict[int, dict] = {}
    values = ["a", "b", 1, 1.5, True, None, "é"]
    uniques_made = most_uniques_held = 0
    for step in range(3000):
        if step == 100:
            index.grow(n_rows)  # rows past the first capacity come after a grow
        row = int(rng.integers(0, 64 if step < 100 else n_rows))
        if row in metadata:
            metadata.pop(row)
            index.remove(row)
        if rng.random() < 0.7:
            meta = {
                key: values[int(rng.integers(len(values)))]
                for key in ("x", "y")
                if rng.random() < 0.8
            }
            if rng.random() < 0.1:
                meta["unique"] = f"u{step}"  # values that come once and go
                uniques_made += 1
            if rng.random() < 0.1:
                meta["list"] = [1, 2]  # not filterable: never indexed
            metadata[row] = meta
            spelled_back = index.add(row, canonical_json(meta))
            assert spelled_back == ("list" not in meta)
        held_now = sum("unique" in m for m in metadata.values())
        most_uniques_held = max(most_uniques_held, held_now)
        if step % 50 == 0:
            for flt in ({"x": "a"}, {"x": 1, "y": None}, {"y": True}, {"x": "é"}, {"list": [1, 2]}):
                got = index.rows_matching(flt, index.capacity).tolist()
                assert got == brute_force(metadata, flt), (step, flt)
            for held_row, meta in metadata.items():
                scalars = {k: v for k, v in meta.items() if k != "list"}
                assert index.spelling(held_row) == canonical_json(scalars)
    # Emptied values are forgotten and their codes reused: the table never outgrows what was
    # held at once.
    held = {canonical_json(m["unique"]) for m in metadata.values() if "unique" in m}
    assert set(index.value_counts("unique")) == held
    assert len(index.columns["unique"].spellings) <= most_uniques_held < uniques_made / 4
    assert "list" not in index.columns
    for key in ("x", "y"):
        expected: dict[str, int] = {}
        for meta in metadata.values():
            if key in meta:
                spelled = canonical_json(meta[key])
                expected[spelled] = expected.get(spelled, 0) + 1
        assert index.value_counts(key) == expected


def test_a_key_whose_last_value_goes_is_forgotten():
    index = MetadataIndex(capacity=4)
    index.add(0, '{"k": "v"}')
    index.add(1, '{"k": "v"}')
    index.remove(0)
    assert index.value_counts("k") == {'"v"': 1}
    index.remove(1)
    assert index.columns == {}
    assert index.rows_matching({"k": "v"}, 4).tolist() == []


def test_only_canonical_scalar_metadata_is_left_to_the_index_to_spell():
    index = MetadataIndex(capacity=8)
    assert index.add(0, canonical_json({"b": 1.5, "a": "é", "c": None, "d": True}))
    assert index.spelling(0) == canonical_json({"a": "é", "b": 1.5, "c": None, "d": True})
    assert index.add(1, "{}") and index.spelling(1) == "{}"
    assert not index.add(2, '{"a":"x"}')  # not canonical_json's spelling: kept as given
    assert not index.add(3, canonical_json({"a": "x", "tags": ["p", "q"]}))
    assert index.spelling(3) == '{"a": "x"}'  # the indexed part only


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.text(), _SCALARS, max_size=4), min_size=1, max_size=6))
def test_any_scalar_metadata_is_spelled_back_as_canonical_json(rows):
    index = MetadataIndex(capacity=len(rows))
    for row, meta in enumerate(rows):
        assert index.add(row, canonical_json(meta))
    for row, meta in enumerate(rows):
        assert index.spelling(row) == canonical_json(meta)


def test_an_empty_filter_is_refused():
    with pytest.raises(ValueError, match="empty filter"):
        MetadataIndex(capacity=4).rows_matching({}, 4)


def test_a_column_restored_from_its_codes_equals_the_original():
    column = KeyColumn(capacity=8)
    for row, spelling in enumerate(['"a"', '"b"', '"a"', '"c"']):
        column.set(row, spelling)
    column.clear(1)  # "b" is gone: a free code in the table
    restored = KeyColumn.restore(16, column.codes[:4], column.spellings)
    assert restored.code_of == column.code_of
    assert restored.counts == column.counts
    assert restored.free_codes == column.free_codes
    assert (restored.codes[4:] == NO_VALUE).all()
    restored.set(5, '"d"')  # takes the free code
    assert restored.code_of['"d"'] == 1  # "b"'s old code


def test_a_restore_whose_codes_and_table_disagree_is_refused():
    with pytest.raises(ValueError, match="spellings"):
        KeyColumn.restore(4, np.array([0, 2], dtype=np.int32), ['"a"'])
    with pytest.raises(ValueError, match="rows for spelling"):
        KeyColumn.restore(4, np.array([0, 0], dtype=np.int32), ['"a"', '"b"'])
