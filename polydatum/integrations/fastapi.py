"""FastAPI: a dependency giving the DAL of the request's polydatum context.

The context itself is opened by :class:`polydatum.integrations.asgi.PolydatumMiddleware`
(one per request or websocket session). It ends before the response status goes out,
so a 2xx means the work is committed; an ``HTTPException``, a
``RequestValidationError`` or an exception an ``@app.exception_handler`` answered
reaches it and rolls the work back (see :mod:`polydatum.integrations.asgi`)::

    from typing import Annotated
    from fastapi import Depends, FastAPI
    from polydatum.integrations.asgi import PolydatumMiddleware
    from polydatum.integrations.fastapi import DAL

    app = FastAPI()
    app.add_middleware(PolydatumMiddleware, data_manager=dm)

    @app.get("/books/{book_id}")
    async def book(book_id: int, dal: DAL):
        return await dal.books.get(book_id)

``DAL`` is ``Annotated[DataAccessLayer, Depends(get_dal)]``; ``Context`` gives the
:class:`~polydatum.context.DataAccessContext` (its ``meta``, its resources). Sync
endpoints (run in the threadpool) see the request's context too. Background tasks run
after the response, when the request's context has ended: the injected DAL raises
:class:`~polydatum.errors.NoActiveContextError` there; a background task opens its own
context (``async with dm.dal() as dal:``).
"""

from __future__ import annotations

from typing import Annotated

from polydatum.integrations import missing_framework

try:
    from fastapi import Depends
    from starlette.requests import HTTPConnection
except ImportError as _error:  # pragma: no cover - exercised in a subprocess test
    missing_framework("polydatum.integrations.fastapi", "FastAPI", "fastapi", _error)

from polydatum.access import DataAccessLayer
from polydatum.context import DataAccessContext
from polydatum.integrations import asgi

__all__ = ["DAL", "Context", "get_context", "get_dal"]


def get_context(connection: HTTPConnection) -> DataAccessContext:
    """Dependency: the request's context (``LookupError`` without the middleware)."""
    return asgi.get_context(connection)


def get_dal(connection: HTTPConnection) -> DataAccessLayer:
    """Dependency: the request's DAL."""
    return asgi.get_context(connection).dal


#: ``dal: DAL`` in an endpoint's signature injects the request's DAL.
DAL = Annotated[DataAccessLayer, Depends(get_dal)]
#: ``ctx: Context`` injects the request's context.
Context = Annotated[DataAccessContext, Depends(get_context)]
