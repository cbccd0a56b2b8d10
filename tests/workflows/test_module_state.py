"""Production workers pass the workflows package through the sandbox (worker.WORKFLOW_RUNNER):
its modules are imported once per process and shared by every instance. That is only safe
while no module keeps state an instance could change; these tests keep it that way."""

from __future__ import annotations
import __future__

import dataclasses
import enum
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


def _immutable(value: object) -> bool:
    if isinstance(value, (*IMMUTABLE_SCALARS, __future__._Feature)) or _code_or_type(value):
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.__dataclass_params__.frozen  # type: ignore[attr-defined]
    if isinstance(value, tuple | frozenset):
        return all(_immutable(v) for v in value)
    if isinstance(value, types.MappingProxyType):
        return all(_immutable(k) and _immutable(v) for k, v in value.items())
    return False


def _code_or_type(value: object) -> bool:
    """Classes, functions, modules and typing constructs: definitions, not state."""
    return (
        isinstance(value, type | types.FunctionType | types.ModuleType | typing.TypeVar)
        or isinstance(value, types.GenericAlias)
        or type(value).__module__ == "typing"
        or callable(value)
    )


def _workflow_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(workflows.__path__, prefix="workflows.")] + [
        "workflows"
    ]


@pytest.mark.parametrize("name", _workflow_modules())
def test_workflow_module_keeps_no_mutable_state(name: str) -> None:
    module = importlib.import_module(name)
    mutable = {
        attr: type(value).__name__
        for attr, value in vars(module).items()
        if not attr.startswith("__") and not _immutable(value)
    }
    assert mutable == {}, f"{name} has module-level mutable state shared by all instances"


def test_the_check_catches_mutable_state() -> None:
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


def test_production_worker_passes_the_workflows_package_through() -> None:
    restrictions = worker.WORKFLOW_RUNNER.restrictions
    assert "workflows" in restrictions.passthrough_modules
    # everything else keeps the default restrictions
    assert restrictions.invalid_modules == worker.SandboxRestrictions.default.invalid_modules
