"""Instruments declared when they are created, so that /metrics lists every family from
the start: a family with no measurement yet is shown as one series of zero.

Prometheus alerts on `absent(...)` and `increase(...)` need a series before the first
event: OpenTelemetry exports a counter's labels, or a histogram, only once measured.
Counters whose label values are known in advance (tenants, reasons) are also set to
zero for them by their owners (`SessionMetrics.declare_tenant`, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .guard import never_raises

Callback = Callable[[CallbackOptions], Iterable[Observation]]


@dataclass(frozen=True)
class Declared:
    """One instrument as Prometheus sees it: `kind` is its type there (an up-down
    counter is a gauge)."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    unit: str
    description: str


class Declarations:
    """Every instrument created through `Instruments`, by name."""

    def __init__(self) -> None:
        self._items: dict[str, Declared] = {}

    def add(self, declared: Declared) -> None:
        self._items[declared.name] = declared

    def __iter__(self) -> Iterator[Declared]:
        return iter(list(self._items.values()))


class Instruments:
    """Creates instruments on one meter, declaring each in `declarations`."""

    def __init__(self, meter: metrics.Meter, declarations: Declarations) -> None:
        self._meter = meter
        self._declarations = declarations

    def _declare(self, name: str, kind: str, unit: str, description: str) -> None:
        self._declarations.add(Declared(name, kind, unit, description))

    def counter(self, name: str, unit: str, description: str) -> metrics.Counter:
        self._declare(name, "counter", unit, description)
        return self._meter.create_counter(name, unit=unit, description=description)

    def up_down_counter(self, name: str, unit: str, description: str) -> metrics.UpDownCounter:
        self._declare(name, "gauge", unit, description)
        return self._meter.create_up_down_counter(name, unit=unit, description=description)

    def histogram(
        self, name: str, unit: str, description: str, buckets: Sequence[float]
    ) -> metrics.Histogram:
        self._declare(name, "histogram", unit, description)
        return self._meter.create_histogram(
            name,
            unit=unit,
            description=description,
            explicit_bucket_boundaries_advisory=list(buckets),
        )

    def gauge(self, name: str, unit: str, description: str, callback: Callback) -> None:
        """An observable gauge; `callback` runs at each collection (on the exporter's
        thread: it must only read), and a failure in it is logged, not raised."""
        self._declare(name, "gauge", unit, description)
        self._meter.create_observable_gauge(
            name, callbacks=[_guarded(callback)], unit=unit, description=description
        )

    def observed_up_down_counter(
        self, name: str, unit: str, description: str, callback: Callback
    ) -> None:
        """An observable up-down counter (the conventions' type for pool connections)."""
        self._declare(name, "gauge", unit, description)
        self._meter.create_observable_up_down_counter(
            name, callbacks=[_guarded(callback)], unit=unit, description=description
        )


def _guarded(callback: Callback) -> Callback:
    guarded = never_raises(lambda options: list(callback(options)))
    return lambda options: guarded(options) or []


def _family(declared: Declared) -> CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily:
    """An empty family named as the OpenTelemetry exporter names it, with one zero series."""
    # The exporter's own naming rules (name sanitised, unit mapped and appended).
    from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_full_name

    name, unit = sanitize_full_name(declared.name), map_unit(declared.unit)
    if declared.kind == "counter":
        return CounterMetricFamily(name, declared.description, value=0, unit=unit)
    if declared.kind == "gauge":
        return GaugeMetricFamily(name, declared.description, value=0, unit=unit)
    return HistogramMetricFamily(
        name, declared.description, buckets=[("+Inf", 0)], sum_value=0, unit=unit
    )


class DeclaredFamilies(Collector):
    """What `source` collects, plus a zero series for each declared family it lacks."""

    def __init__(self, source: CollectorRegistry, declarations: Declarations) -> None:
        self._source = source
        self._declarations = declarations

    def describe(self) -> list[object]:
        return []  # not collected at registration (the reader is not ready then)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        seen: set[str] = set()
        for family in self._source.collect():
            seen.add(family.name)
            yield family  # type: ignore[misc]
        for declared in self._declarations:
            empty = _family(declared)
            if empty.name not in seen:
                yield empty
