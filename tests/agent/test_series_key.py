"""A series is identified once: agent.model.SeriesKey is interned, cached on the point, derived (not
recomputed) when a stage changes only labels, and survives pickling as the same identity."""

from __future__ import annotations

import dataclasses
import gc
import pickle
import weakref

import pytest

from agent import model
from agent.model import IntValue, Kind, Point, Resource, Scope, SeriesKey, key_of, relabelled, series_key


def point(labels: tuple[tuple[str, str], ...], name: str = "req", resource: Resource | None = None) -> Point:
    return Point(name, Kind.SUM, labels, 1_000, value=2.0, resource=resource)


def test_points_of_one_series_share_one_key_and_others_do_not() -> None:
    res = Resource((("service.name", "api"),))
    a = point((("code", "200"),), resource=res)
    b = point((("code", "200"),), resource=Resource((("service.name", "api"),)))  # equal, not the same
    key = key_of(a)
    assert key_of(b) is key
    assert a.key is key  # cached on the point: later stages do not compute it again
    assert key_of(point((("code", "500"),), resource=res)) is not key
    assert key_of(point((("code", "200"),), name="other", resource=res)) is not key
    assert key_of(point((("code", "200"),))) is not key  # another resource
    assert series_key("req", Kind.GAUGE, (("code", "200"),), res) is not key  # another kind
    assert series_key("req", Kind.SUM, (("code", "200"),), res, Scope("lib")) is not key
    with pytest.raises(TypeError, match="interned"):
        SeriesKey()


def test_a_key_lives_while_something_holds_it() -> None:
    p = point((("gone", "soon"),))
    ref = weakref.ref(key_of(p))
    gc.collect()
    assert ref() is p.key  # the point holds it
    del p
    gc.collect()
    assert ref() is None  # nothing holds it: the intern table does not keep it alive
    assert ("req", Kind.SUM, (("gone", "soon"),), None, None) not in model._KEYS  # nor its entry
    assert key_of(point((("gone", "soon"),))).labels == (("gone", "soon"),)


def test_typed_values_compare_as_text_and_the_first_seen_wins() -> None:
    typed = point((("code", IntValue("200")),))
    plain = point((("code", "200"),))
    assert key_of(typed) is key_of(plain)
    assert type(key_of(plain).labels[0][1]) is IntValue


def test_derive_is_memoised_on_the_key_and_relabelled_carries_the_new_key() -> None:
    calls = []

    def add(labels: tuple[tuple[str, str], ...], name: str, value: str) -> tuple[tuple[str, str], ...]:
        calls.append(name)
        return tuple(sorted((*labels, (name, value))))

    p = point((("code", "200"),))
    key = key_of(p)
    tenant = key.derive(("tenant_id", "a"), add, "tenant_id", "a")
    assert tenant.labels == (("code", "200"), ("tenant_id", "a"))
    assert key.derive(("tenant_id", "a"), add, "tenant_id", "a") is tenant
    assert calls == ["tenant_id"]  # the label tuple was built once for the series
    assert tenant is series_key("req", Kind.SUM, (("code", "200"), ("tenant_id", "a")))
    q = relabelled(p, tenant)
    assert q.key is tenant and q.labels == tenant.labels and (q.value, q.kind) == (p.value, p.kind)
    assert relabelled(p, tenant, 5.0).value == 5.0


def test_replace_never_carries_a_stale_key() -> None:
    p = point((("code", "200"),))
    key_of(p)
    q = dataclasses.replace(p, labels=(("code", "500"),))
    assert q.key is None
    assert key_of(q).labels == (("code", "500"),)
    assert p == dataclasses.replace(p)  # the key takes no part in equality


def test_pickled_keys_and_points_are_interned_again() -> None:
    res = Resource((("service.name", "api"),))
    p = point((("code", "200"),), resource=res)
    key = key_of(p)
    assert pickle.loads(pickle.dumps(key)) is key
    back = pickle.loads(pickle.dumps(p))
    assert back == p and back.key is key
    hash(res)
    assert pickle.loads(pickle.dumps(res))._hash == 0  # str hashes differ between processes
    assert pickle.loads(pickle.dumps(Scope("lib", "1", (("a", "b"),)))) == Scope("lib", "1", (("a", "b"),))
