"""The Prometheus series store finds a point's series by the point's identity (agent.model.SeriesKey):
one lookup a point after the first, and never a series the store has removed."""

from __future__ import annotations

import pytest

from agent.model import Kind, Point, Resource, Temporality
from exporters.prometheus_series import SeriesStore


def counter(name: str, value: float, resource: Resource | None = None, **labels: str) -> Point:
    return Point(name, Kind.SUM, tuple(sorted(labels.items())), 1_000_000_000, value=value, resource=resource)


@pytest.fixture
def store() -> SeriesStore:
    return SeriesStore(max_series=3)


def test_a_known_series_is_found_without_translating_again(
    store: SeriesStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    located: list[str] = []
    slow = store._locate
    monkeypatch.setattr(store, "_locate", lambda p: located.append(p.name) or slow(p))
    res = Resource((("service.name", "api"),))
    first = store.update(counter("http.requests", 2.0, res, code="200"), now=1.0)
    again = store.update(
        counter("http.requests", 3.0, Resource((("service.name", "api"),)), code="200"), now=2.0
    )
    assert first is again and again is not None
    assert again.value == 5.0
    assert located == ["http.requests"]  # the second point, an equal identity, was found by its key
    assert again.labels == (("code", "200"), ("job", "api"))


def test_points_whose_prometheus_identity_collides_share_one_series(store: SeriesStore) -> None:
    a = store.update(counter("a.b", 1.0), now=1.0)
    b = store.update(counter("a_b", 1.0), now=1.0)
    assert a is b and a is not None and a.value == 2.0
    assert store.size == 1


def test_an_expired_series_is_never_updated_again(store: SeriesStore) -> None:
    old = store.update(counter("jobs", 4.0), now=1.0)
    assert old is not None
    assert store.expire(10.0, now=100.0) == [old]
    new = store.update(counter("jobs", 1.0), now=101.0)
    assert new is not None and new is not old
    assert (new.value, old.value) == (1.0, 4.0)  # the total restarts; the removed series is untouched
    assert store.families["jobs_total"] == {(): new} and store.size == 1


def test_a_series_refused_as_it_was_made_is_not_found_later(store: SeriesStore) -> None:
    bad = Point("latency", Kind.HISTOGRAM, (), 1_000_000_000, temporality=Temporality.DELTA)  # no histogram
    assert store.update(bad, now=1.0) is None
    assert store.refused == {"missing_histogram": 1}
    assert store.size == 0 and "latency" not in store.families
    assert store.update(bad, now=2.0) is None
    assert store.refused == {"missing_histogram": 2}
    assert store.size == 0
