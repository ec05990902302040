"""`cdpae search` without a service: reading vector files, the table, the error paths.

The same command against a real running service is in test_client_service.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.cli import main as cdpae
from app.client import Hit, QueryResult
from app.search_cli import VectorFileError, format_table, parse_filter, read_vectors
from tests.support.ports import free_port


def test_reads_npy_json_and_text_files(tmp_path):
    batch = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "q.npy", batch)
    (tmp_path / "q.json").write_text(json.dumps(batch.tolist()))
    np.savetxt(tmp_path / "q.csv", batch, delimiter=",")
    np.savetxt(tmp_path / "q.txt", batch[:1])
    for name in ("q.npy", "q.json", "q.csv"):
        assert np.array_equal(read_vectors(tmp_path / name), batch)
    assert read_vectors(tmp_path / "q.txt").shape == (1, 3)
    np.save(tmp_path / "one.npy", batch[0])
    assert read_vectors(tmp_path / "one.npy").shape == (1, 3)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.zeros((2, 2, 2)), "expected one vector or a 2-D batch"),
        (np.array([1.0, np.nan]), "NaN"),
        (np.array(["a", "b"]), "expected numbers"),
    ],
)
def test_bad_vector_files_say_what_is_wrong(tmp_path, content, message):
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(VectorFileError, match=message):
        read_vectors(tmp_path / "bad.npy")


def test_filter_pairs():
    assert parse_filter(["category=art", "lang=en=gb"]) == {"category": "art", "lang": "en=gb"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_filter(["category"])


def test_table_has_one_aligned_block_per_query():
    results = [
        QueryResult(hits=[Hit("t-1", 0.91234, {"category": "art"}), Hit("t-22", 0.5, {})]),
        QueryResult(hits=[]),
    ]
    text = format_table(results, target="text")
    blocks = text.split("\n\n")
    assert len(blocks) == 2
    lines = blocks[0].splitlines()
    assert lines[0] == "query 0: 2 hits"
    assert lines[1].split() == ["rank", "text", "id", "score", "metadata"]
    assert lines[3].split() == ["1", "t-1", "0.9123", "category=art"]
    assert lines[4].split() == ["2", "t-22", "0.5000"]
    # the score column is right-aligned: its last character lines up
    assert lines[3].index("0.9123") == lines[4].index("0.5000")
    assert blocks[1].startswith("query 1: 0 hits")


def test_usage_errors_exit_2_and_name_the_problem(tmp_path, capsys):
    assert cdpae(["search", "--modality", "image", "--vector-file", str(tmp_path / "no.npy")]) == 2
    assert "no such file" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", np.ones(3))
    args = ["search", "--modality", "image", "--vector-file", str(tmp_path / "q.npy")]
    assert cdpae([*args, "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert cdpae([*args, "--filter", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_unreachable_service_exits_1(tmp_path, capsys, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setattr("app.client.time.sleep", lambda _s: None)  # skip the backoff waits
    np.save(tmp_path / "q.npy", np.ones(3))
    code = cdpae(
        [
            "search",
            "--url",
            f"http://127.0.0.1:{port}",
            "--modality",
            "text",
            "--vector-file",
            str(tmp_path / "q.npy"),
        ]
    )
    assert code == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
