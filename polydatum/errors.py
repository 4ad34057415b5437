"""Exceptions raised by polydatum.

The names and the hierarchy are those of polydatum 0.9.1 (plus 1.0's
``DalMethodError`` and ``InvalidMiddleware``) so that ``except`` clauses in
existing applications keep matching. New exceptions subclass the old ones (or a
built-in the old code raised) so they are caught where the old ones were.
"""

from __future__ import annotations


class PolydatumException(Exception):
    """Base class of every error polydatum raises on purpose."""


class ServiceError(PolydatumException):
    """A service failed; ``code`` is an HTTP-like status an integration may use."""

    code = 500


class NotFound(ServiceError):
    """The thing a service was asked for does not exist."""

    code = 404


class AlreadyExistsException(PolydatumException):
    """A service, resource or middleware is already registered under that name.

    Use ``DataManager.replace_service`` / ``replace_resource`` to override on purpose.
    """


class RegistrationError(PolydatumException, TypeError):
    """Something passed to a ``register_*`` call cannot be used.

    A ``TypeError`` too, because the value has the wrong kind (0.9.1 raised a
    bare ``Exception``; catching ``Exception`` still works).
    """


class InvalidMiddleware(RegistrationError):
    """A method middleware is not a callable ``mw(request, handler)`` (polydatum 1.0)."""


class ValidationError(PolydatumException):
    """``DataManager.validate()`` found problems; ``problems`` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in the DataManager registration:\n{lines}"
        )


class MiddlewareException(PolydatumException):
    """Base class of context-middleware errors."""


class MiddlewareSetupException(MiddlewareException):
    """A context middleware returned without yielding during setup."""


class ResourceException(PolydatumException):
    """Base class of resource errors."""


class ResourceSetupException(ResourceException):
    """A resource generator returned without yielding during setup."""


class CommitError(ResourceException):
    """A resource could not make the context's work durable: its COMMIT failed or was refused.

    Raised by a resource while it tears down (the SQL resource raises it when the
    database rejects the commit, or had already aborted the transaction). Unlike every
    other resource teardown error it is **not suppressed**: the context's work is lost,
    so the ``with`` block raises it (an HTTP integration answers 5xx, a Celery task
    fails) instead of completing as if the work were saved. The database's own error
    is its ``__cause__``. It is not in ``get_resource_exit_errors()``: it is raised, not
    swallowed.
    """


class ErrorResponse(PolydatumException):
    """The context of a request that was answered with an error status.

    HTTP integrations end a request's context with this error when the response
    status is an error (by default ``>= 400``) and no exception reached the context,
    so that resources roll back instead of committing work the client was told
    failed. ``status`` is the HTTP status. The integration does not re-raise it: the
    response already tells the client.
    """

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(
            f"the response status is {status}, an error: the request's work is rolled back"
        )


class HandledAsSuccess(PolydatumException):
    """The application answered a success status for an exception that rolled the work back.

    The exception reached the request's context (the framework turned it into a
    response while handling it), so the context rolled back; a 1xx-3xx status would
    tell the client the work was done. The response is not sent: this error is raised
    instead (its ``__cause__`` is the handled exception) and the framework answers 500.
    A new error rather than the handled exception raised again, because an outer layer
    with the same handlers (Starlette's app-level ExceptionMiddleware) would catch that
    one again. To make such a response stand, a context middleware suppresses the
    exception on purpose: the work then commits.
    """

    def __init__(self, status: int, handled: BaseException) -> None:
        self.status = status
        self.handled = handled
        super().__init__(
            f"the application answered {status} for {type(handled).__qualname__}, but the "
            "request's work was rolled back for that exception: the response is not sent"
        )


class IncompleteResponse(PolydatumException):
    """A request's response was not delivered complete: its work rolls back.

    The client disconnected during a streaming response, a write to it failed, or the
    application returned without finishing its response. The request's context ends
    with this error; it is not raised (the server deals with the response). ``reason``
    says which of these happened.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: the request's work is rolled back")


class UnknownResourceError(ResourceException, AttributeError):
    """No resource is registered under the name asked for.

    An ``AttributeError`` because ``ctx.name`` is attribute access (as in 0.9.1),
    so ``hasattr(ctx, "name")`` and ``getattr(ctx, "name", None)`` keep working.
    """


class ContextStateError(PolydatumException, RuntimeError):
    """The context was used in a state that does not allow it.

    A ``RuntimeError``, which is what 0.9.1 raised in these cases. The message
    names the state and says what to do instead.
    """


class NoActiveContextError(PolydatumException, RuntimeError, AssertionError):
    """The DAL or ``Service._ctx`` was used with no context active.

    0.9.1 raised ``AssertionError`` from the DAL and ``RuntimeError`` from
    ``Service._ctx``; this error is both so that old ``except`` clauses match.
    """


#: The longest DAL path accepted, in characters and in segments (``dal["a.b.c"]`` has
#: three): longer ones are refused before any look-up, and error messages show only an
#: excerpt of them. Real paths are a few segments of identifiers.
MAX_DAL_PATH_LENGTH = 512
MAX_DAL_PATH_SEGMENTS = 32
_DAL_PATH_EXCERPT = 80
_DAL_REASON_LIMIT = 200


class DalMethodError(PolydatumException, AttributeError):
    """A DAL path does not resolve to a public service method (polydatum 1.0).

    ``path`` holds the path segments that were asked for.
    """

    def __init__(self, path: tuple[object, ...] | None = None, reason: str = "") -> None:
        self.path = tuple(path or ())
        dotted = ".".join(str(getattr(p, "name", p)) for p in self.path[:MAX_DAL_PATH_SEGMENTS])
        if len(self.path) > MAX_DAL_PATH_SEGMENTS or len(dotted) > MAX_DAL_PATH_LENGTH:
            # A path may come from untrusted input: the message shows a bounded excerpt.
            dotted = f"{dotted[:_DAL_PATH_EXCERPT]}…"
        message = f"Invalid dal method: {dotted}"
        if len(reason) > _DAL_REASON_LIMIT:  # it may quote a name from the path
            reason = f"{reason[:_DAL_REASON_LIMIT]}…"
        if reason:
            message = f"{message} ({reason})"
        super().__init__(message)


class ErrorsOnClose(PolydatumException):
    """Deprecated since 0.8.4 (resource exit errors are suppressed); kept for imports."""

    def __init__(self, message: str, exceptions: list[BaseException]) -> None:
        super().__init__(message)
        self.message = message
        self.exceptions = exceptions

    def __str__(self) -> str:
        return f"<{type(self).__name__} {self.message}: {self.exceptions}>"


class TeardownErrors(ExceptionGroup[Exception]):
    """Raised at context exit under the strict teardown policy.

    Groups every error a resource raised while tearing down (normally these are
    suppressed and recorded). When the context also failed, that error is the
    ``__cause__``.
    """
