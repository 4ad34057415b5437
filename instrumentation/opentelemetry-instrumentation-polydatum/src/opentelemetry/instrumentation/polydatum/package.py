"""What this instrumentation instruments: checked by ``opentelemetry-instrument``."""

_instruments = ("polydatum >= 2.0.0.dev0",)
