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
request that never touches data pays nothing). Because it opens inside the request,
the context span is a child of the request span of
``opentelemetry-instrumentation-flask``, whatever order the two were installed in.

The request boundary
--------------------
The context ends *before the response is sent* (the rule is
:func:`polydatum.integrations.close_for_response`), in an ``after_request`` function
that :func:`init_app` registers -- public Flask API only: no method of the app is
replaced, so nothing depends on the signature of Flask's internal methods.

* An exception that no error handler handled ends the context with that exception
  (polydatum learns it from Flask's ``got_request_exception`` signal): rollback, and
  the 500 response is sent.
* Flask has no public way to tell which exception an error handler handled (``abort``,
  an ``HTTPException``, ``@app.errorhandler``): the signal and ``teardown_request`` only
  see unhandled ones, and a handler returns a response. So for those the *status*
  decides: ``error_status(status)`` (default ``status >= 400``) ends the context with
  :class:`~polydatum.errors.ErrorResponse` (rollback; the response is sent as made);
  an error handler that answers a success status commits.
* Otherwise the context ends normally and commits. If that raises (a failed commit,
  :class:`~polydatum.errors.CommitError`; the database's error under
  ``transaction_middleware``), the after_request function raises it, and Flask handles
  it like any error of the request: it sends ``got_request_exception``, logs it and
  answers 500 (your ``errorhandler(500)`` gets an ``InternalServerError`` whose
  ``original_exception`` is the error); with ``PROPAGATE_EXCEPTIONS`` (testing, debug)
  it propagates out of the app instead.

Flask runs ``after_request`` functions in reverse order of registration: call
:func:`init_app` *before* registering after_request functions (yours, other
extensions') that may change the response, so that polydatum's runs after them and
sees the final status. The DAL is usable until the context has ended; after that,
:func:`context` raises (a second context would end after the response).

A response whose body is a *generator* (``Response(gen())``, ``stream_with_context``)
is streamed: the status and the chunks go out as the generator produces them, so
polydatum cannot hold the status back. The context stays open while the body is
produced (a ``stream_with_context`` body may even open it, with :func:`dal`) and ends
when the body is exhausted, before the server finishes the response. If ending it
fails, the error is raised from the body's iteration and the server aborts the
transfer: the client gets an incomplete response, never a complete 2xx. An error while
streaming rolls back; a client that disconnects (the server closes the body early)
rolls back with :class:`~polydatum.errors.IncompleteResponse`. Other bodies
run no application code while they are sent (a ``send_file`` file, an error page) and
HEAD, 1xx, 204 and 304 responses send none: their context ends in the after_request
function, like any other.

A ``teardown_request`` function ends a context still open when Flask tears the request
down -- on paths where the after_request function did not run (``PROPAGATE_EXCEPTIONS``,
``app.test_request_context()``) -- with the exception Flask passes; what ending raises
there is logged (``polydatum.flask.teardown_failed``), as Flask requires of teardown
functions.

Meta comes from ``meta()`` (called inside the request; default :func:`default_meta`:
``request_id`` from the ``X-Request-Id`` header or generated, ``method``, and
``route``, the URL rule such as ``/books/<int:book_id>`` -- never headers wholesale).
The request id of a request that used a context is echoed in ``x-request-id``.

Flask has no shutdown hook: call :func:`polydatum.integrations.dispose_resources`
from your server's (gunicorn ``worker_exit``) or ``atexit``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import structlog

from polydatum.integrations import (
    ErrorStatus,
    accept_request_id,
    close_for_response,
    is_error_status,
    missing_framework,
)

try:
    from flask import (
        Flask,
        current_app,
        g,
        got_request_exception,
        has_request_context,
        request,
    )
    from flask.wrappers import Response
    from werkzeug.exceptions import InternalServerError
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    missing_framework("polydatum.integrations.flask", "Flask", "flask", _error)

from polydatum.integrations.wsgi import ResponseBody
from polydatum.meta import Meta

if TYPE_CHECKING:
    from polydatum.access import DataAccessLayer
    from polydatum.context import DataAccessContext
    from polydatum.registry import DataManager

__all__ = ["context", "dal", "default_meta", "get_data_manager", "init_app"]

_EXTENSION = "polydatum"
_G_CONTEXT = "_polydatum_context"
_G_REQUEST_ID = "_polydatum_request_id"
_G_UNHANDLED = "_polydatum_unhandled"  # the exception got_request_exception reported
_G_STREAM = "_polydatum_stream"  # the ResponseBody that ends the context
_G_ENDED = "_polydatum_ended"  # the request's context has ended: no new one


@dataclass(frozen=True)
class _State:
    data_manager: DataManager
    meta: Callable[[], Mapping[str, Any] | Meta]
    response_header: str | None
    error_status: ErrorStatus


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
    error_status: ErrorStatus = is_error_status,
) -> None:
    """Give each request of ``app`` a polydatum context of ``data_manager``.

    ``validate`` runs :meth:`DataManager.validate` now (``ValidationError`` lists
    every problem), so a broken registration fails at startup, not on a request.
    ``error_status(status)`` tells which response statuses roll the request's work
    back (default :func:`~polydatum.integrations.is_error_status`: ``>= 400``).
    Registers an ``after_request`` and a ``teardown_request`` function and a
    ``got_request_exception`` receiver (see the module docs for the order).
    """
    if validate:
        data_manager.validate()
    app.extensions[_EXTENSION] = _State(
        data_manager, meta or default_meta, response_header, error_status
    )
    app.after_request(_end_for_response)
    app.teardown_request(_end_at_teardown)
    got_request_exception.connect(_unhandled, app)


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
        if g.get(_G_ENDED):
            raise RuntimeError(
                "this request's polydatum context has ended: polydatum ends it before "
                "the response is sent, in the after_request function init_app registered "
                "(use the DAL in after_request functions registered after init_app, or "
                "open `with dm.context():`)"
            )
        state = _state()
        meta = state.meta()
        ctx = state.data_manager.context(meta if isinstance(meta, Meta) else dict(meta))
        ctx.__enter__()
        setattr(g, _G_CONTEXT, ctx)
        stream: ResponseBody | None = g.get(_G_STREAM)
        if stream is not None:  # opened by a stream_with_context body: it ends it
            stream.adopt(ctx)
    return ctx


def dal() -> DataAccessLayer:
    """The current request's DAL (see :func:`context`)."""
    return context().dal


def _unhandled(sender: Flask, exception: Exception, **extra: Any) -> None:
    """``got_request_exception``: remember the error Flask is answering with a 500."""
    if has_request_context():
        setattr(g, _G_UNHANDLED, exception)


def _has_body(response: Response) -> bool:
    """Whether the server will send the response's body (HTTP: not for HEAD, 1xx, 204, 304)."""
    status = response.status_code
    return not (request.method == "HEAD" or 100 <= status < 200 or status in (204, 304))


def _end_for_response(response: Response) -> Response:
    """after_request: end the request's context before the response is sent."""
    state = _state()
    unhandled: Exception | None = g.pop(_G_UNHANDLED, None)
    abandoned: ResponseBody | None = g.pop(_G_STREAM, None)
    if abandoned is not None:
        # Flask is making a second response (an after_request function raised after
        # ours): the streamed one will never be sent, its context ends here.
        abandoned.release()
    ctx: DataAccessContext | None = g.get(_G_CONTEXT)
    if unhandled is None and inspect.isgenerator(response.response) and _has_body(response):
        status = response.status_code
        chunks = cast("Iterable[bytes]", response.response)  # a generator of str or bytes
        body = ResponseBody(chunks, ctx, lambda: (status, None), state.error_status)
        response.response = body
        setattr(g, _G_STREAM, body)
    else:
        g.pop(_G_CONTEXT, None)
        setattr(g, _G_ENDED, True)
        if ctx is not None:
            try:
                close_for_response(ctx, response.status_code, unhandled, state.error_status)
            except Exception:
                if unhandled is None:
                    raise  # Flask answers 500 (its handle_exception)
                # Flask is already answering an unhandled error, and would only log what
                # an after_request function raises now, then send this response even if
                # it says success: answer 500 ourselves.
                current_app.logger.exception(
                    "polydatum: ending the request's context failed while answering an error"
                )
                response = current_app.make_response(
                    InternalServerError(original_exception=unhandled)
                )
    header = state.response_header
    rid = g.get(_G_REQUEST_ID)
    if header is not None and rid is not None and header not in response.headers:
        response.headers[header] = rid
    return response


def _end_at_teardown(exc: BaseException | None) -> None:
    """teardown_request: end a context that is still open (after_request did not run)."""
    stream: ResponseBody | None = g.get(_G_STREAM)
    if stream is not None:
        if exc is None or isinstance(exc, GeneratorExit):
            # The streamed body ends the context once it is exhausted or closed (Flask
            # tears a request down when it returns the response, and a
            # stream_with_context body again at its end, or when it is closed).
            return
        g.pop(_G_STREAM, None)
        stream.release()
    ctx: DataAccessContext | None = g.pop(_G_CONTEXT, None)
    setattr(g, _G_ENDED, True)
    if ctx is None:
        return
    try:
        if exc is None:
            ctx.__exit__(None, None, None)
        else:
            try:
                ctx.__exit__(type(exc), exc, exc.__traceback__)
            except BaseException as raised:
                if raised is not exc:
                    raise
    except Exception as error:
        structlog.get_logger("polydatum").warning(
            "polydatum.flask.teardown_failed",
            error_type=type(error).__qualname__,
            exc_info=(type(error), error, error.__traceback__),
        )
