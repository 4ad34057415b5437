"""The version of opentelemetry-instrumentation-polydatum (follows polydatum's)."""

__version__ = "2.0.0.dev0"
