"""Production workers pass the workflows package through the sandbox (worker.WORKFLOW_RUNNER):
its modules are imported once per process and shared by every instance. That is only safe
while no module keeps state an instance could change; these tests keep it that way."""

from __future__ import annotations
import __future__

import dataclasses
import enum
import functools
import importlib
import pkgutil
import types
import typing
from datetime import timedelta
from decimal import Decimal

import pytest

import worker
import workflows

IMMUTABLE_SCALARS = (str, bytes, int, float, bool, Decimal, timedelta, type(None), enum.Enum)
PACKAGE = "workflows"
# bookkeeping that pydantic and abc keep on every model class (pydantic's configuration and
# fields, ABCMeta's cache of isinstance answers): the frameworks', not the process's
FRAMEWORK_CLASS_ATTRS = frozenset(
    {"model_config", "model_fields", "model_computed_fields", "_abc_impl"}
)


# module state that is allowed: a cache keyed by content hash, whose values are frozen (every
# instance that asks for a key gets the same value, and no instance can change it)
CONTENT_ADDRESSED = frozenset({("workflows.blueprint.check", "parsed_version")})


def _immutable(value: object) -> bool:
    if isinstance(value, (*IMMUTABLE_SCALARS, __future__._Feature)) or _definition(value):
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.__dataclass_params__.frozen  # type: ignore[attr-defined]
    if isinstance(value, tuple | frozenset):
        return all(_immutable(v) for v in value)
    if isinstance(value, types.MappingProxyType):
        return all(_immutable(k) and _immutable(v) for k, v in value.items())
    return False


def _definition(value: object) -> bool:
    """Classes, functions, modules and typing constructs: definitions, not state (what they
    hold themselves is looked at by `_state_in`)."""
    return (
        isinstance(value, type | types.FunctionType | types.ModuleType | typing.TypeVar)
        or isinstance(value, types.GenericAlias)
        or type(value).__module__ == "typing"
        or (_bound(value) and isinstance(value.__self__, type | types.ModuleType | None))
    )


def _bound(value: object) -> typing.TypeGuard[types.MethodType | types.BuiltinMethodType]:
    return isinstance(value, types.MethodType | types.BuiltinMethodType)


def _ours(value: object) -> bool:
    return str(getattr(value, "__module__", "")).split(".")[0] == PACKAGE


def _state_in(path: str, value: object, seen: set[int]) -> dict[str, str]:
    """Where `value` (a module attribute) keeps mutable state: itself, a class attribute of a
    class of ours, or a callable's closure, defaults, attributes, cache or bound object."""
    if id(value) in seen:
        return {}
    seen.add(id(value))
    if hasattr(value, "cache_info") and hasattr(value, "cache_clear"):  # functools caches
        return {path: "functools cache"}
    if isinstance(value, functools.partial):
        found = _state_in(f"{path}.func", value.func, seen)
        for i, arg in enumerate(value.args):
            found |= _state_in(f"{path}.args[{i}]", arg, seen)
        for name, arg in value.keywords.items():
            found |= _state_in(f"{path}.keywords[{name}]", arg, seen)
        return found
    if _bound(value) and value.__self__ is not None:  # e.g. `add = _registry.append`
        return _state_in(f"{path}.__self__", value.__self__, seen)
    if isinstance(value, type):
        return _class_state(path, value, seen) if _ours(value) else {}
    if isinstance(value, types.FunctionType):
        return _function_state(path, value, seen) if _ours(value) else {}
    if not _immutable(value):
        return {path: type(value).__name__}
    return {}


def _function_state(path: str, fn: types.FunctionType, seen: set[int]) -> dict[str, str]:
    found: dict[str, str] = {}
    for i, cell in enumerate(fn.__closure__ or ()):
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell: nothing held yet
            continue
        found |= _state_in(f"{path}.<closure {fn.__code__.co_freevars[i]}>", held, seen)
    defaults = fn.__defaults__ or ()
    positional = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    for name, default in zip(positional[len(positional) - len(defaults) :], defaults, strict=True):
        found |= _state_in(f"{path}.<default {name}>", default, seen)
    for name, default in (fn.__kwdefaults__ or {}).items():
        found |= _state_in(f"{path}.<default {name}>", default, seen)
    for name, attr in vars(fn).items():
        if not name.startswith("__"):
            found |= _state_in(f"{path}.{name}", attr, seen)
    return found


def _class_state(path: str, cls: type, seen: set[int]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, attr in vars(cls).items():
        if name.startswith("__") or name in FRAMEWORK_CLASS_ATTRS:
            continue
        if issubclass(cls, enum.Enum) and name.startswith("_") and name.endswith("_"):
            continue  # the enum machinery's _sunder_ tables of members
        if isinstance(attr, staticmethod | classmethod):
            attr = attr.__func__
        elif isinstance(attr, property):
            attr = attr.fget
        elif isinstance(attr, functools.cached_property):
            attr = attr.func  # the cache lives on each instance
        found |= _state_in(f"{path}.{name}", attr, seen)
    return found


def _module_state(module: types.ModuleType) -> dict[str, str]:
    found: dict[str, str] = {}
    seen: set[int] = set()
    for attr, value in vars(module).items():
        if not attr.startswith("__"):
            found |= _state_in(attr, value, seen)
    return found


def _workflow_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(workflows.__path__, prefix="workflows.")] + [
        "workflows"
    ]


@pytest.mark.parametrize("name", _workflow_modules())
def test_workflow_module_keeps_no_mutable_state(name: str) -> None:
    module = importlib.import_module(name)
    state = {k: v for k, v in _module_state(module).items() if (name, k) not in CONTENT_ADDRESSED}
    assert state == {}, f"{name} has module-level mutable state shared by all instances"


def test_the_content_addressed_cache_gives_frozen_blueprints() -> None:
    from pathlib import Path

    from workflows.blueprint import check

    text = (Path(__file__).parents[2] / "blueprints" / "complaint.yaml").read_text()
    version, canonical = check.canonical(check.load_yaml(text))
    first = check.parsed_version(version, canonical)
    assert check.parsed_version(version, canonical) is first  # shared, not a copy
    with pytest.raises(ValueError):  # frozen: no instance can change what another sees
        first.title = "changed"  # type: ignore[misc]
    with pytest.raises(ValueError, match="not that version"):
        check.parsed_version(version, canonical.replace("Customer", "Client"))


def test_the_check_catches_mutable_values() -> None:
    assert not _immutable([1, 2])
    assert not _immutable({"a": 1})
    assert not _immutable({1})
    assert not _immutable((1, [2]))
    assert not _immutable(types.MappingProxyType({"a": ["b"]}))
    assert _immutable(types.MappingProxyType({"a": ("b",)}))
    assert _immutable(frozenset({"x"}))

    @dataclasses.dataclass
    class Box:
        n: int

    assert not _immutable(Box(1))


# what the check must catch, as a module of the package would define it
_SHARED: list[str] = []


class _Registry:
    entries: typing.ClassVar[dict[str, str]] = {}
    _seen: typing.ClassVar[set[str]] = set()
    NAMES: typing.ClassVar[tuple[str, ...]] = ("a", "b")

    def add(self, name: str) -> None:
        self.entries[name] = name


class _Level(enum.Enum):
    LOW = 1


@functools.lru_cache
def _cached(n: int) -> int:
    return n


def _counter():
    calls: list[int] = []

    def count() -> int:
        calls.append(1)
        return len(calls)

    return count


def _remember(x: int, seen: list[int] = []) -> None:  # noqa: B006 - the state to be caught
    seen.append(x)


def _pure(x: int, *, scale: int = 2) -> int:
    return x * scale


def test_the_check_catches_state_in_classes_and_callables(monkeypatch) -> None:
    module = types.ModuleType("workflows.example")
    for obj in (_Registry, _Level, _counter, _remember, _pure):
        monkeypatch.setattr(obj, "__module__", module.__name__)
    count = _counter()
    monkeypatch.setattr(count, "__module__", module.__name__)
    monkeypatch.setattr(_cached, "__module__", module.__name__)
    module.__dict__.update(
        Registry=_Registry,
        Level=_Level,
        cached=_cached,
        count=count,
        remember=_remember,
        pure=_pure,
        add_shared=_SHARED.append,
        scaled=functools.partial(_pure, scale=3),
        collect=functools.partial(_remember, seen=[]),
        limit=5,
    )
    assert _module_state(module) == {
        "Registry.entries": "dict",
        "Registry._seen": "set",
        "cached": "functools cache",
        "count.<closure calls>": "list",
        "remember.<default seen>": "list",
        "add_shared.__self__": "list",
        "collect.keywords[seen]": "list",
    }


def test_production_worker_passes_the_workflows_package_through() -> None:
    restrictions = worker.WORKFLOW_RUNNER.restrictions
    assert "workflows" in restrictions.passthrough_modules
    # everything else keeps the default restrictions
    assert restrictions.invalid_modules == worker.SandboxRestrictions.default.invalid_modules
