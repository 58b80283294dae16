"""Ray metric objects from the catalog's specs. Each process that records builds its own."""

from __future__ import annotations

from ray.util import metrics

from services.metrics.catalog import Kind, MetricSpec


def counter(spec: MetricSpec) -> metrics.Counter:
    _check(spec, Kind.COUNTER)
    return metrics.Counter(spec.name, spec.description, tag_keys=spec.labels)


def gauge(spec: MetricSpec) -> metrics.Gauge:
    _check(spec, Kind.GAUGE)
    return metrics.Gauge(spec.name, spec.description, tag_keys=spec.labels)


def histogram(spec: MetricSpec) -> metrics.Histogram:
    _check(spec, Kind.HISTOGRAM)
    return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels)


def _check(spec: MetricSpec, kind: Kind) -> None:
    if spec.kind is not kind:
        raise TypeError(f"{spec.name} is a {spec.kind.value}, not a {kind.value}")
