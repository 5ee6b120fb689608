"""Every cleveragents error survives pickle: same class, message, args and attributes.

Agent runtimes ship errors across processes (multiprocessing, task queues), so
an error that cannot be rebuilt, or comes back with another message, breaks
whoever catches it there. The classes are discovered, not listed: a new error
class is covered the day it is added, and an argument type this test cannot
make up fails loudly instead of being skipped.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import types
import typing
from collections.abc import Sequence
from typing import Any

import pytest

import cleveragents.errors as errors_module
import cleveragents.runtime  # noqa: F401  (its errors are CleverAgentsError subclasses too)
from cleveragents.errors import CleverAgentsError, PlanError, PlanProblem

_PROBLEMS = [
    PlanProblem("plans/restock.yaml", 3, "steps[0].id", "duplicate step id 'a'"),
    PlanProblem("plans/other.yaml", None, "", "file not found"),
]


def _all_subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_subclasses(sub)}
    return found


def _error_classes() -> list[type[BaseException]]:
    in_module = {
        cls
        for _, cls in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors_module.__name__
    }
    ours = {
        cls
        for cls in _all_subclasses(CleverAgentsError)
        if cls.__module__.startswith("cleveragents")
    }
    return sorted(in_module | ours, key=lambda cls: (cls.__module__, cls.__qualname__))


def _value(cls: type[BaseException], name: str, annotation: Any) -> Any:
    """Return a value for parameter *name* of *cls*, distinct per name where it can be."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    kinds = [option for option in options if option is not type(None)]
    assert len(kinds) == 1, f"{cls.__qualname__}({name}: {annotation}) needs a value here"
    kind = kinds[0]
    if kind is str:
        return f"{name} of {cls.__name__}"
    if kind is int:
        return 7
    if kind is float:
        return 1.25
    if typing.get_origin(kind) is Sequence:
        (item,) = typing.get_args(kind)
        if item is str:
            return ["first", "second"]
        if item is PlanProblem:
            return list(_PROBLEMS)
    raise AssertionError(f"{cls.__qualname__}({name}: {annotation}): teach this test a value")


def _arguments(cls: type[BaseException]) -> tuple[list[Any], dict[str, Any]]:
    """Make up every argument *cls* takes, following ``**context`` up to the base classes."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    first = True
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass.__module__ == "builtins":
            if first:
                args.append(f"what went wrong in {cls.__name__}")
            break
        hints = typing.get_type_hints(init)
        takes_more = False
        for parameter in list(inspect.signature(init).parameters.values())[1:]:
            name = parameter.name
            if parameter.kind is parameter.VAR_KEYWORD:
                takes_more = True
            elif parameter.kind is parameter.KEYWORD_ONLY:
                kwargs.setdefault(name, _value(cls, name, hints[name]))
            elif parameter.kind is not parameter.VAR_POSITIONAL and first:
                args.append(_value(cls, name, hints[name]))
        first = False
        if not takes_more:
            break
    return args, kwargs


def _comparable(value: Any) -> Any:
    """Return *value* in a form ``==`` compares by content (slotted objects have no __eq__)."""
    if isinstance(value, list | tuple):
        return type(value)(_comparable(item) for item in value)
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items()}
    slots = getattr(type(value), "__slots__", None)
    if slots:
        return (type(value), {slot: getattr(value, slot) for slot in slots})
    return value


def test_the_errors_are_discovered() -> None:
    found = _error_classes()
    names = {cls.__name__ for cls in found}
    assert {"CheckpointExpiredError", "PoolExhaustedError", "HandlerClosedError"} <= names
    assert {"Interrupted", "ExpectationFailed"} <= names  # defined outside errors.py
    every_exception_in_all = {
        name
        for name in errors_module.__all__
        if isinstance(getattr(errors_module, name), type)
        and issubclass(getattr(errors_module, name), BaseException)
    }
    assert every_exception_in_all <= names


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__qualname__)
def test_an_error_survives_pickle_with_its_message_and_attributes(
    cls: type[BaseException], protocol: int
) -> None:
    args, kwargs = _arguments(cls)
    original = cls(*args, **kwargs)
    original.add_note("a note added on the way up")
    back = pickle.loads(pickle.dumps(original, protocol))
    assert type(back) is cls
    assert str(back) == str(original)
    assert back.args == original.args
    assert _comparable(vars(back)) == _comparable(vars(original))
    for name, given in kwargs.items():
        if name in vars(original):
            assert _comparable(getattr(back, name)) == _comparable(given)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__qualname__)
def test_an_error_copies_with_its_message_and_attributes(cls: type[BaseException]) -> None:
    args, kwargs = _arguments(cls)
    original = cls(*args, **kwargs)
    for copied in (copy.copy(original), copy.deepcopy(original)):
        assert type(copied) is cls
        assert str(copied) == str(original)
        assert _comparable(vars(copied)) == _comparable(vars(original))


def test_a_plan_error_keeps_each_problem_after_pickle() -> None:
    error = PlanError(_PROBLEMS)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(error, protocol))
        assert [str(problem) for problem in back.problems] == [
            "plans/restock.yaml:3: steps[0].id: duplicate step id 'a'",
            "plans/other.yaml: file not found",
        ]
        assert [problem.line for problem in back.problems] == [3, None]
