"""The ``polydatum`` command.

``polydatum inspect MODULE:ATTR`` prints the registration of a DataManager -- the
services tree, the resources, the context middleware in setup *and* teardown order,
and the method middleware in call order -- so middleware order can be checked
without running a request. Other subcommands plug in without editing this file:
a module listed in :func:`_optional_subcommands` (``polydatum.demo.cli``,
``polydatum.waterfall``) that defines ``register_cli(subparsers)`` adds its parser
there, with ``set_defaults(func=handler)``; a handler returns the exit status and may
raise :class:`CliError` for a one-line error message.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from polydatum.errors import ValidationError
from polydatum.registry import DataManager

#: The help of every subcommand's MODULE:ATTR argument (see :func:`load_data_manager`).
TARGET_HELP = "MODULE:ATTR of a DataManager, a factory returning one, or an object holding one"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def load_data_manager(target: str) -> DataManager:
    """Import ``MODULE:ATTR``: a DataManager, a zero-argument factory, or an object with
    exactly one DataManager attribute (an application factory's result); ATTR may be dotted."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"expected MODULE:ATTR (e.g. myapp.data:dm), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CliError(f"cannot import module {module_name!r}: {error}") from error
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    called = ""
    if not isinstance(obj, DataManager) and _is_factory(obj):
        obj = obj()
        called = "()"
    if isinstance(obj, DataManager):
        return obj
    # An application (an ASGI/WSGI app, what an app factory returns) holding its
    # DataManager: in an attribute, Flask's extensions, a middleware's arguments...
    held = held_data_managers(obj)
    what = f"{target}{called} is of type {type(obj).__name__}, not a polydatum DataManager"
    if len(held) == 1:
        ((where, found),) = held.items()
        print(f"polydatum: {what}; using the DataManager at {where}", file=sys.stderr)
        return found
    if held:
        names = ", ".join(sorted(held))
        raise CliError(
            f"{what}, and it holds several ({names}): point at one of them, "
            f"e.g. a module-level `dm = ...` as MODULE:dm"
        )
    raise CliError(
        f"{what}: point at a DataManager, a zero-argument function returning one, "
        f"or an application holding one"
    )


def _is_factory(obj: Any) -> bool:
    """A function (or class) callable with no arguments: an application factory. An
    ASGI or WSGI application is callable too, but with arguments: it is not called."""
    if not (inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj)):
        return False
    try:
        inspect.signature(obj).bind()
    except (TypeError, ValueError):
        return False
    return True


#: How deep :func:`held_data_managers` looks (app → middleware list → entry → kwargs).
SEARCH_DEPTH = 4


def held_data_managers(obj: Any) -> dict[str, DataManager]:
    """The DataManagers ``obj`` holds, by where they were found (``.extensions['x']``):
    attributes, mapping values and sequence items, breadth first, :data:`SEARCH_DEPTH`
    levels deep, each object visited once."""
    found: dict[str, DataManager] = {}
    seen: set[int] = {id(obj)}
    level: list[tuple[str, Any]] = [("", obj)]
    for _ in range(SEARCH_DEPTH):
        following: list[tuple[str, Any]] = []
        for where, value in level:
            for name, child in _children(value):
                if id(child) in seen:
                    continue
                seen.add(id(child))
                if isinstance(child, DataManager):
                    found.setdefault(f"{where}{name}", child)
                elif not isinstance(child, str | bytes | int | float | bool | type(None)):
                    following.append((f"{where}{name}", child))
        level = following
    return found


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(f"[{key!r}]", child) for key, child in list(value.items())[:100]]
    if isinstance(value, list | tuple):
        return [(f"[{index}]", child) for index, child in enumerate(value[:100])]
    attributes = getattr(value, "__dict__", None)
    if not isinstance(attributes, dict) or inspect.ismodule(value) or inspect.isclass(value):
        return []
    return [(f".{name}", child) for name, child in list(attributes.items())[:100]]


def _tree_lines(services: dict[str, Any], prefix: str = "", path: str = "") -> list[str]:
    lines = []
    items = list(services.items())
    for index, (name, info) in enumerate(items):
        last = index == len(items) - 1
        branch = "└── " if last else "├── "
        lines.append(f"{prefix}{branch}{path}{name}  [{info['class']}]")
        child_prefix = prefix + ("    " if last else "│   ")
        for m in info["methods"]:
            lines.append(f"{child_prefix}· {m}()")
        lines.extend(_tree_lines(info["services"], child_prefix, f"{path}{name}."))
    return lines


def format_inspection(description: dict[str, Any], problems: Sequence[str]) -> str:
    """Render :meth:`DataManager.describe` as the text ``polydatum inspect`` prints."""
    out = ["Services (dal.…)"]
    out.extend(_tree_lines(description["services"]) or ["  (none)"])
    out.append("")
    out.append("Resources (created lazily, torn down most recent first)")
    if not description["resources"]:
        out.append("  (none)")
    for name, info in description["resources"].items():
        extra = " ping" if info["ping"] else ""
        attrs = ", ".join(f"{k}={v}" for k, v in info["attributes"].items())
        out.append(f"  {name}: {info['callable']}{extra}{f'  {{{attrs}}}' if attrs else ''}")
    out.append("")
    chain = description["context_middleware"]
    out.append("Context middleware")
    out.append("  setup order:")
    out.extend(f"    {i}. {m}" for i, m in enumerate(chain["setup_order"], 1))
    if not chain["setup_order"]:
        out.append("    (none)")
    out.append("  teardown order:")
    out.extend(f"    {i}. {m}" for i, m in enumerate(chain["teardown_order"], 1))
    if not chain["teardown_order"]:
        out.append("    (none)")
    out.append("")
    out.append("Method middleware (outermost first)")
    out.extend(f"  {i}. {m}" for i, m in enumerate(description["method_middleware"], 1))
    out.append("")
    if problems:
        out.append(f"Problems ({len(problems)})")
        out.extend(f"  ✗ {p}" for p in problems)
    else:
        out.append("Validation: ok")
    return "\n".join(out)


def cmd_inspect(args: argparse.Namespace) -> int:
    dm = load_data_manager(args.target)
    description = dm.describe()
    problems = dm.validate(raise_on_error=False)
    if args.json:
        print(json.dumps({**description, "problems": problems}, indent=2))
    else:
        print(format_inspection(description, problems))
    return 1 if problems else 0


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="show services, resources and middleware order of a DataManager",
        description="Print the services tree, the resources and both middleware chains "
        "in execution order, then validate the registration.",
    )
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)


#: Subcommand registrars: each adds a parser to the subparsers object.
SUBCOMMANDS: list[Callable[[Any], None]] = [_add_inspect]


#: The subcommands that need extras: module defining ``register_cli``, then the
#: command, its help and the extras it needs (named when the module cannot be imported).
OPTIONAL_SUBCOMMANDS: list[tuple[str, str, str, str]] = [
    (
        "polydatum.waterfall",
        "trace",
        "run one DAL call in a fresh context and print its waterfall",
        "cli,sdk",
    ),
    (
        "polydatum.demo.cli",
        "demo",
        "run the example bookstore and show its telemetry",
        "cli,sdk,sql",
    ),
]


def _optional_subcommands() -> list[Callable[[Any], None]]:
    found: list[Callable[[Any], None]] = []
    for module_name, command, help_text, extras in OPTIONAL_SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            found.append(_missing_extra(command, help_text, extras, error))
            continue
        register = getattr(module, "register_cli", None)
        if callable(register):
            found.append(register)
    return found


def _missing_extra(
    command: str, help_text: str, extras: str, error: ImportError
) -> Callable[[Any], None]:
    """A registrar for ``command`` whose run says which extra to install."""
    missing = error.name or str(error)

    def run(args: argparse.Namespace) -> int:
        raise CliError(
            f"polydatum {command} needs {missing}, which is not installed: "
            f"pip install 'polydatum[{extras}]'"
        )

    def register(sub: Any) -> None:
        p = sub.add_parser(command, help=f"{help_text} (needs polydatum[{extras}])")
        p.set_defaults(func=run, takes_any_arguments=True)

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polydatum", description="Inspect, trace and demo polydatum DataManagers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in [*SUBCOMMANDS, *_optional_subcommands()]:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polydatum`` console script."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        result: int = args.func(args)
    except CliError as error:
        print(f"polydatum: error: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        print(f"polydatum: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
