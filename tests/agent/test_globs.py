"""agent.globs.NameFilter: include globs minus exclude globs (``*`` crosses dots), an optional refusal
of the component's own outputs, and nothing taken without an include glob."""

from __future__ import annotations

from agent import globs
from agent.globs import NameFilter


def test_include_minus_exclude_and_unless() -> None:
    f = NameFilter(["api.*", "db.query"], ["api.health.*"], unless=lambda n: n.endswith("_score"))
    assert f.takes_any
    assert f("api.v1.latency") and f("db.query")
    assert not f("api.health.ping") and not f("db.query.rows") and not f("web.latency")
    assert not f("api.latency_score")
    assert f("api.v1.latency")  # answered from the cache, the same


def test_no_include_takes_nothing() -> None:
    f = NameFilter([], ["x"])
    assert not f.takes_any and not f("anything")


def test_the_cache_stays_bounded() -> None:
    f = NameFilter(["*"])
    for i in range(globs._CACHE_MAX + 10):
        assert f(f"m{i}")
    assert len(f._cache) <= globs._CACHE_MAX
