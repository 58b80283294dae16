"""Reading a Prometheus text scrape (Ray's metrics agent) for the metrics tests."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Scrape:
    samples: tuple[Sample, ...]

    def names(self, prefix: str) -> set[str]:
        return {s.name for s in self.samples if s.name.startswith(prefix)}

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [
            s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of ``name`` with these labels (Ray keeps one per process)."""
        return sum(s.value for s in self.matching(name, **labels))


def parse(text: str) -> Scrape:
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        samples.append(Sample(name, dict(_LABEL.findall(labels or "")), float(value)))
    return Scrape(tuple(samples))


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse(response.read().decode())


def poll(url: str, mismatches: Callable[[Scrape], list[str]], timeout_s: float) -> tuple[Scrape, list[str]]:
    """Scrape until ``mismatches`` finds none or ``timeout_s`` passes (Ray's agent exports what
    processes report every few seconds); the last scrape and what still did not match."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = scrape(url)
        wrong = mismatches(current)
        if not wrong or time.monotonic() > deadline:
            return current, wrong
        time.sleep(1.0)
