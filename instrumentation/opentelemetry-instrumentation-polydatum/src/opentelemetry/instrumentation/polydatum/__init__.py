"""OpenTelemetry instrumentation for polydatum.

polydatum records its own spans, metrics and logs through ``opentelemetry-api`` (see
``polydatum.telemetry``); nothing needs patching. This package makes that telemetry
follow the OpenTelemetry conventions for instrumentations:

* ``opentelemetry-instrument python app.py`` loads :class:`PolydatumInstrumentor`
  through the ``opentelemetry_instrumentor`` entry point and calls ``instrument()``,
  which turns polydatum's telemetry on; spans and metrics go to whatever SDK the
  application (or an OpenTelemetry distro) configured as the global providers.
* ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=polydatum`` (or ``*``) turns it off: the
  instrumentor is then never loaded, and polydatum reads the same variable itself,
  once, when the first context of any DataManager opens (not at import). While it
  names polydatum, no DataManager records. Calling ``instrument()`` in code overrides
  it, as it does for contrib's instrumentors (the variable only keeps
  ``opentelemetry-instrument`` from calling them).
* ``PolydatumInstrumentor().uninstrument()`` turns off what ``instrument()`` turned on:
  the DataManagers that record to the default providers.

Usage without the ``opentelemetry-instrument`` wrapper::

    from opentelemetry.instrumentation.polydatum import PolydatumInstrumentor

    PolydatumInstrumentor().instrument()

Providers: a DataManager created with ``tracer_provider=`` / ``meter_provider=`` was
instrumented explicitly by the application, like an app given to a contrib
instrumentor's ``instrument_app()``: it records to those providers whether or not this
instrumentor is instrumented, and ``uninstrument()`` leaves it (and only the providers
it was given) recording. Every other DataManager uses the providers passed to
``instrument(tracer_provider=..., meter_provider=...)``, or the global providers when
``instrument()`` got none, looked up per context (so an SDK configured later is picked
up); after ``uninstrument()`` it records nothing.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.polydatum.package import _instruments
from opentelemetry.instrumentation.polydatum.version import __version__

__all__ = ["PolydatumInstrumentor", "__version__"]


class PolydatumInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Turns polydatum's native telemetry on (``instrument``) and off (``uninstrument``)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        from polydatum import telemetry

        # Providers given here serve every DataManager created without its own.
        telemetry.enable(
            tracer_provider=kwargs.get("tracer_provider"),
            meter_provider=kwargs.get("meter_provider"),
        )

    def _uninstrument(self, **kwargs: Any) -> None:
        from polydatum import telemetry

        telemetry.disable()
