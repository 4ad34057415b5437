"""What the type checkers must say about an application's use of polydatum.

Checked by tests/test_typing.py with mypy --strict and pyright (strict): every
``assert_type`` must hold, and every line marked ``# expect-error`` must be an error
for both checkers (each checker's ignore comment is required to be used: mypy's
``warn_unused_ignores`` and pyright's ``reportUnnecessaryTypeIgnoreComment``). This file
is never run; it is only read by the checkers.
"""

from __future__ import annotations

from typing import Protocol, assert_type

from polydatum import DataManager, Service
from polydatum.context import DalScope, DataAccessContext, Meta
from polydatum.dal import DataAccessLayer


class Note:
    def __init__(self, text: str) -> None:
        self.text = text


class Notes(Service):
    def get(self, note_id: int) -> Note:
        return Note(f"note {note_id}")

    async def aget(self, note_id: int) -> Note:
        return Note(f"note {note_id}")


class AppServices(Protocol):
    """The application's services, declared once for the type checker."""

    @property
    def notes(self) -> Notes: ...


typed: DataManager[AppServices] = DataManager()
typed.register_services(notes=Notes())
untyped = DataManager()


def typed_sync() -> Note:
    scope = typed.dal({"user": "ann"})
    assert_type(scope, DalScope[AppServices])
    with scope as dal:
        assert_type(dal, AppServices)
        assert_type(dal.notes, Notes)
        assert_type(dal.notes.get(1), Note)
        dal.notes.gett(1)  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]  # expect-error
        dal.noets.get(1)  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]  # expect-error
        dal.notes.get("1")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]  # expect-error
        return dal.notes.get(1)
    # A context middleware may suppress the block's error (``__exit__`` returns bool):
    # then execution continues here, and both checkers require this line.
    raise LookupError("the note was not read: a context middleware suppressed the error")


def assigned_inside() -> Note:
    with typed.dal() as dal:
        note = dal.notes.get(1)
    # The same reason: pyright reports "note" as possibly unbound after the block.
    return note  # pyright: ignore[reportPossiblyUnboundVariable]  # expect-error


async def typed_async() -> Note:
    async with typed.dal() as dal:
        assert_type(dal, AppServices)
        assert_type(await dal.notes.aget(2), Note)
        return await dal.notes.aget(2)
    raise LookupError("the note was not read: a context middleware suppressed the error")


def contexts() -> None:
    with typed.context({"user": "ann"}) as ctx:
        assert_type(ctx, DataAccessContext[AppServices])
        assert_type(ctx.meta, Meta)
        assert_type(ctx.dal, AppServices)
        assert_type(ctx.dal.notes.get(3), Note)
    with untyped.context() as plain:
        assert_type(plain, DataAccessContext[DataAccessLayer])
        assert_type(plain.dal, DataAccessLayer)


def untyped_dal() -> None:
    with untyped.dal() as dal:
        assert_type(dal, DataAccessLayer)
        dal.anything.goes(1)  # commands: no static check without declared services
    assert_type(untyped.get_dal(), DataAccessLayer)
    assert_type(typed.get_dal(), AppServices)
