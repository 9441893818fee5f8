"""merging.compatibility says what plan_merge does on the same pair: a refusal is its
message, a warning is its warning; nothing re-implemented in between."""

from __future__ import annotations

import pytest

from merging import MergeConfig, MergeError
from merging.compatibility import as_markdown, compatibility
from merging.config import InputModel
from merging.plan import plan_merge
from merging.sources import open_model


def _plan(base: str, other: str):
    config = MergeConfig("task_arithmetic", models=[InputModel(other, {"weight": 1.0})], base_model=base,
                         dtype="float32")
    return plan_merge(config, {base: open_model(base), other: open_model(other)})


def test_the_report_agrees_with_plan_merge(tiny):
    base = tiny.path("base")
    others = [tiny.path(name) for name in ("c1", "wide", "more_vocab", "deep")]
    report = compatibility(others, base)
    assert report.reference == base and report.models[0].role == "reference (base)"
    assert not report.can_merge  # 'wide' and 'deep' cannot
    for verdict in report.models[1:]:
        try:
            warnings = _plan(base, verdict.name).warnings
        except MergeError as error:
            assert verdict.error == str(error)
        else:
            assert verdict.can_merge and verdict.warnings == list(warnings)
    by_name = {v.name: v for v in report.models}
    assert by_name[tiny.path("c1")].can_merge and by_name[tiny.path("c1")].warnings == []
    assert "hidden size 64, the base has 32" in by_name[tiny.path("wide")].error
    vocabulary = by_name[tiny.path("more_vocab")]
    assert vocabulary.can_merge and any("matched by token" in w for w in vocabulary.warnings)
    assert not by_name[tiny.path("deep")].can_merge
    assert by_name[tiny.path("wide")].facts["hidden"] == 64 and vocabulary.facts["vocab"] == 104


def test_the_table_shows_each_verdict(tiny):
    table = as_markdown(compatibility([tiny.path("wide"), tiny.path("c1")], tiny.path("base")))
    lines = table.splitlines()
    assert "reference (base)" in lines[2]
    assert "cannot merge: model '" in lines[3] and "has hidden size 64, the base has 32" in lines[3]
    assert lines[4].endswith("| can merge |")


def test_an_unreadable_model_is_said_so_and_one_model_is_refused(tiny, tmp_path):
    report = compatibility([str(tmp_path / "missing")], tiny.path("base"))
    assert report.models[1].error.startswith("cannot be read: ")
    with pytest.raises(MergeError, match="at least two models"):
        compatibility([tiny.path("base")], tiny.path("base"))
