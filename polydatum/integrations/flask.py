"""Flask: one polydatum context per request, the DAL in views through :func:`dal`.

::

    from flask import Flask
    from polydatum.integrations import flask as pd_flask

    app = Flask(__name__)
    pd_flask.init_app(app, dm)

    @app.get("/books/<int:book_id>")
    def book(book_id):
        return pd_flask.dal().books.get(book_id)

The context opens on the first :func:`dal` / :func:`context` call of a request (a
request that never touches data pays nothing) and closes when Flask tears the request
down -- after the view and ``after_request`` hooks, with the error that ended the
request, if any, so resources commit or roll back. Because it opens inside the view,
the context span is a child of the request span of ``opentelemetry-instrumentation-flask``
whatever order the two were installed in; it is closed before any ``teardown_request``
function runs, so the request span is still open and current.

Meta comes from ``meta()`` (called inside the request; default :func:`default_meta`:
``request_id`` from the ``X-Request-Id`` header or generated, ``method``, and
``route``, the URL rule such as ``/books/<int:book_id>`` -- never headers wholesale).
The request id of a request that used a context is echoed in ``x-request-id``.

Flask has no shutdown hook: call :func:`polydatum.integrations.dispose_resources`
from your server's (gunicorn ``worker_exit``) or ``atexit``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from polydatum.integrations import accept_request_id, missing_framework

try:
    from flask import Flask, current_app, g, has_request_context, request
    from flask.wrappers import Response
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    missing_framework("polydatum.integrations.flask", "Flask", "flask", _error)

from polydatum.meta import Meta

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataAccessLayer, DataManager

__all__ = ["context", "dal", "default_meta", "get_data_manager", "init_app"]

_EXTENSION = "polydatum"
_G_CONTEXT = "_polydatum_context"
_G_REQUEST_ID = "_polydatum_request_id"


@dataclass(frozen=True)
class _State:
    data_manager: DataManager
    meta: Callable[[], Mapping[str, Any] | Meta]
    response_header: str | None


def default_meta() -> dict[str, Any]:
    """Meta for the current request: ``request_id``, ``method`` and, once matched, ``route``."""
    meta: dict[str, Any] = {"request_id": _request_id(), "method": request.method}
    if request.url_rule is not None:
        meta["route"] = request.url_rule.rule
    return meta


def _request_id() -> str:
    rid: str | None = g.get(_G_REQUEST_ID)
    if rid is None:
        rid = accept_request_id(request.headers.get("X-Request-Id"))
        setattr(g, _G_REQUEST_ID, rid)
    return rid


def init_app(
    app: Flask,
    data_manager: DataManager,
    *,
    meta: Callable[[], Mapping[str, Any] | Meta] | None = None,
    response_header: str | None = "x-request-id",
    validate: bool = True,
) -> None:
    """Give each request of ``app`` a polydatum context of ``data_manager``.

    ``validate`` runs :meth:`DataManager.validate` now (``ValidationError`` lists
    every problem), so a broken registration fails at startup, not on a request.
    """
    if validate:
        data_manager.validate()
    app.extensions[_EXTENSION] = _State(data_manager, meta or default_meta, response_header)
    original = app.do_teardown_request

    def do_teardown_request(exc: BaseException | None = None) -> None:
        try:
            _close(exc)
        finally:
            original(exc)

    # Close before every teardown_request function (and so before the tracing
    # instrumentation ends the request span), whatever order they were registered in.
    app.do_teardown_request = do_teardown_request  # type: ignore[method-assign]
    app.after_request(_echo_request_id)


def _state() -> _State:
    state = current_app.extensions.get(_EXTENSION)
    if state is None:
        raise RuntimeError(
            "polydatum is not set up for this Flask app: call "
            "polydatum.integrations.flask.init_app(app, data_manager) first"
        )
    return state  # type: ignore[no-any-return]


def get_data_manager() -> DataManager:
    """The DataManager of the current app."""
    return _state().data_manager


def context() -> DataAccessContext:
    """The current request's context, entered on first use (inside a request only)."""
    if not has_request_context():  # outside a request there is no teardown to close it
        raise RuntimeError(
            "polydatum.integrations.flask.context() is only available during a request; "
            "elsewhere use `with dm.context():`"
        )
    ctx: DataAccessContext | None = g.get(_G_CONTEXT)
    if ctx is None:
        state = _state()
        meta = state.meta()
        ctx = state.data_manager.context(meta if isinstance(meta, Meta) else dict(meta))
        ctx.__enter__()
        setattr(g, _G_CONTEXT, ctx)
    return ctx


def dal() -> DataAccessLayer:
    """The current request's DAL (see :func:`context`)."""
    return context().dal


def _close(exc: BaseException | None) -> None:
    ctx: DataAccessContext | None = g.pop(_G_CONTEXT, None)
    if ctx is None:
        return
    if exc is None:
        ctx.__exit__(None, None, None)
    else:
        ctx.__exit__(type(exc), exc, exc.__traceback__)


def _echo_request_id(response: Response) -> Response:
    header = _state().response_header
    rid = g.get(_G_REQUEST_ID)
    if header is not None and rid is not None and header not in response.headers:
        response.headers[header] = rid
    return response
