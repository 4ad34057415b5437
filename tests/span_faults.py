"""Span processors that misbehave on purpose, shared by the tests that prove a broken
OpenTelemetry pipeline loses spans, never the application's work."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import SpanProcessor


class RaisingProcessor(SpanProcessor):
    """A span processor that raises in ``on_start`` or ``on_end`` (``where``)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.calls = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.where == "on_start":
            self.calls += 1
            raise RuntimeError("processor on_start exploded")

    def on_end(self, span: Any) -> None:
        if self.where == "on_end":
            self.calls += 1
            raise RuntimeError("processor on_end exploded")
