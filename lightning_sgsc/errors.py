"""The exception types of lightning-sgsc, defined once.

Every message follows one shape: ``` `arg` must be <rule>, got <value!r>. ``` followed, where it helps, by a hint.
Catch :class:`SGSCError` to catch everything this package raises on purpose.
"""

from __future__ import annotations


class SGSCError(Exception):
    """Base class of every error raised on purpose by lightning-sgsc."""


class SGSCValueError(SGSCError, ValueError):
    """An argument has the right type but a value that is not allowed."""


class SGSCTypeError(SGSCError, TypeError):
    """An argument (or the model / module given) has a type that is not supported."""


class SGSCRuntimeError(SGSCError, RuntimeError):
    """An operation was asked for in a state where it cannot work (e.g. swapping a model twice)."""


class AlreadyQuantizedError(SGSCRuntimeError):
    """The model already holds quantized twins; swapping again would quantize twice."""


def describe_rule(arg: str, rule: str, value: object, hint: str | None = None) -> str:
    """Formats the package-wide error message ``` `arg` must be rule, got value. hint```."""
    message = f"`{arg}` must be {rule}, got {value!r}."
    return f"{message} {hint}" if hint else message


class SGSCDeprecationWarning(FutureWarning):
    """An argument spelling that still works but goes in a later release (shown to users by default)."""
