"""The drift processor's baseline file: exponential histograms per series, as JSON (format in the
processor's docstring). Read at start, written atomically when new baselines were learnt."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from agent import exphist
from agent.exphist import ExpHistogram
from agent.model import Labels, Resource

FILE_FORMAT = "headwater.drift.baseline/1"
"""The ``format`` field of a baseline file."""

FileKey = tuple[str, Labels, Labels]
"""A series in the baseline file: name, labels and resource attributes, all as text."""


def file_key(name: str, labels: Labels, resource: Resource | None) -> FileKey:
    attributes = resource.attributes if resource is not None else ()
    return (
        name,
        tuple(sorted((str(k), str(v)) for k, v in labels)),
        tuple(sorted((str(k), str(v)) for k, v in attributes)),
    )


def histogram_to_json(h: ExpHistogram) -> dict[str, Any]:
    return {
        "scale": h.scale,
        "zero_count": h.zero_count,
        "count": h.count,
        "sum": h.sum if math.isfinite(h.sum) else None,
        "min": h.min,
        "max": h.max,
        "positive": {"offset": h.positive_offset, "counts": h.positive_counts.tolist()},
        "negative": {"offset": h.negative_offset, "counts": h.negative_counts.tolist()},
    }


def histogram_from_json(d: Any, where: str) -> ExpHistogram:
    """The histogram of one file entry; ValueError naming `where` and the field when it is malformed."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: histogram must be an object")
    try:
        scale = int(d["scale"])
        pos, neg = d.get("positive") or {}, d.get("negative") or {}
        pos_counts = np.asarray(pos.get("counts", []), dtype=np.float64)
        neg_counts = np.asarray(neg.get("counts", []), dtype=np.float64)
        zero = float(d.get("zero_count", 0.0))
        count = float(d["count"])
        low, high = float(d["min"]), float(d["max"])
        total = d.get("sum")
        h_sum = float(total) if total is not None else math.nan
        pos_offset, neg_offset = int(pos.get("offset", 0)), int(neg.get("offset", 0))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where}: histogram field missing or not a number ({exc})") from None
    if not exphist.MIN_SCALE <= scale <= exphist.MAX_SCALE:
        raise ValueError(f"{where}: scale {scale} is outside [{exphist.MIN_SCALE}, {exphist.MAX_SCALE}]")
    if pos_counts.ndim != 1 or neg_counts.ndim != 1:
        raise ValueError(f"{where}: counts must be lists of numbers")
    every = np.concatenate((pos_counts, neg_counts, [zero]))
    if not (np.isfinite(every).all() and (every >= 0).all()):
        raise ValueError(f"{where}: counts must be finite and >= 0")
    if not math.isclose(float(every.sum()), count, rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(f"{where}: count {count:g} is not the sum of the buckets ({float(every.sum()):g})")
    if count > 0 and not low <= high:
        raise ValueError(f"{where}: min is above max")
    return ExpHistogram(scale, zero, pos_offset, pos_counts, neg_offset, neg_counts, count, h_sum, low, high)


def read_baseline_file(path: str) -> dict[FileKey, ExpHistogram]:
    """The baselines of a baseline file; {} when it does not exist; ValueError naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"baseline_file {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise ValueError(f'baseline_file {path}: not a drift baseline file (no "format": "{FILE_FORMAT}")')
    entries = doc.get("series")
    if not isinstance(entries, list):
        raise ValueError(f'baseline_file {path}: "series" must be a list')
    out: dict[FileKey, ExpHistogram] = {}
    for i, e in enumerate(entries):
        where = f"baseline_file {path}: series[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise ValueError(f"{where}: needs a string name")
        labels, resource = e.get("labels", {}), e.get("resource", {})
        if not isinstance(labels, dict) or not isinstance(resource, dict):
            raise ValueError(f"{where}: labels and resource must be objects")
        key = (
            e["name"],
            tuple(sorted((str(k), str(v)) for k, v in labels.items())),
            tuple(sorted((str(k), str(v)) for k, v in resource.items())),
        )
        out[key] = histogram_from_json(e.get("histogram"), where)
    return out


def write_baseline_file(path: str, baselines: dict[FileKey, ExpHistogram]) -> None:
    """Write `baselines` to `path` atomically (a temporary file renamed over it)."""
    doc = {
        "format": FILE_FORMAT,
        "series": [
            {
                "name": name,
                "labels": dict(labels),
                "resource": dict(resource),
                "histogram": histogram_to_json(h),
            }
            for (name, labels, resource), h in baselines.items()
        ],
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
