"""The database handler's settings: handler-wide ones, each engine's, and the id rule."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cleveragents.durations import Duration
from cleveragents.ids import MAX_ID, id_problem
from cleveragents.resource.base import Resource
from cleveragents.resource.handlers.engine import Engine
from cleveragents.resource.handlers.postgresql import PostgreSQLEngine
from cleveragents.resource.handlers.sqlite import SQLiteEngine

OnFull = Literal["wait", "evict_lru"]

#: Engines by the value of ``engine:``; each handler makes its own instance.
ENGINES: dict[str, type[Engine]] = {
    SQLiteEngine.name: SQLiteEngine,
    PostgreSQLEngine.name: PostgreSQLEngine,
}

# The handler-wide defaults, written once: the settings model and the
# handler's constructor both use them.
MAX_CONNECTIONS = 32
ACQUIRE_TIMEOUT = 5.0
IDLE_TIMEOUT = 60.0
ON_FULL: OnFull = "wait"
CHECKPOINT_TTL = 300.0


class DatabaseHandlerSettings(BaseSettings):
    """Handler-wide settings; read from ``CLEVERAGENTS_*`` variables by ``from_config``."""

    model_config = SettingsConfigDict(env_prefix="CLEVERAGENTS_", extra="ignore", frozen=True)

    max_connections: int = Field(
        default=MAX_CONNECTIONS,
        ge=1,
        description="Open connections at most, lent and idle together.",
    )
    acquire_timeout: Duration = Field(
        default=ACQUIRE_TIMEOUT, description="How long a plan waits for a free connection slot."
    )
    idle_timeout: Duration = Field(
        default=IDLE_TIMEOUT, description="Idle connections are closed after this long."
    )
    on_full: OnFull = Field(
        default=ON_FULL,
        description="When every slot holds a live plan: 'wait', or 'evict_lru' to roll "
        "back the least recently used plan.",
    )
    checkpoint_ttl: Duration = Field(
        default=CHECKPOINT_TTL, gt=0, description="Idle time after which a plan is rolled back."
    )


def _engine_of(value: Any) -> str:
    engine = value.get("engine", "sqlite") if isinstance(value, Mapping) else value.engine
    return engine if isinstance(engine, str) else repr(engine)


@functools.cache
def settings_adapter() -> TypeAdapter[Any]:
    """Return the validator of a database resource: one settings model per engine."""
    choices: Any = tuple(Annotated[cls.settings_model, Tag(name)] for name, cls in ENGINES.items())
    union: Any = Union[choices]  # noqa: UP007 - built from a tuple at run time
    # Inputs stay out of error messages: one of them may be a DSN with a password.
    config = ConfigDict(hide_input_in_errors=True)
    return TypeAdapter(Annotated[union, Discriminator(_engine_of)], config=config)


@functools.lru_cache(maxsize=1024)
def validated(resource: Resource) -> Any:
    """Return the engine settings of *resource* (cached by the resource's value).

    :raises pydantic.ValidationError: a key is unknown, missing or mistyped.
    """
    engine = resource.options.get("engine", "sqlite")
    if not isinstance(engine, str) or engine not in ENGINES:
        # The union would report an unknown engine against the whole resource;
        # report it against the 'engine' key, so the plan error names its line.
        expected = " or ".join(repr(name) for name in ENGINES)
        raise ValidationError.from_exception_data(
            "DatabaseSettings",
            [
                {
                    "type": "literal_error",
                    "loc": ("engine",),
                    "input": engine,
                    "ctx": {"expected": expected},
                }
            ],
        )
    return settings_adapter().validate_python(dict(resource.options))


def check_label(what: str, value: object) -> str:
    """Return *value* if it is a good plan id or checkpoint label, else raise ValueError."""
    if type(value) is str and 0 < len(value) <= MAX_ID and value.isprintable():
        return value  # the common case, without a call: this is on every plan's path
    problem = id_problem(value)
    if problem is not None:
        shown = value[:40] + "..." if isinstance(value, str) and len(value) > 40 else value
        raise ValueError(f"{what} {problem}, got {shown!r}")
    return value  # type: ignore[return-value]  # id_problem checked it is a str


__all__ = [
    "ENGINES",
    "DatabaseHandlerSettings",
    "OnFull",
    "check_label",
    "settings_adapter",
    "validated",
]
