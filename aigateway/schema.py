# -*- test-case-name: tests.test_schema -*-
"""
A small declarative schema language for Admin API entities.

Kong describes every entity as a tree of typed fields with defaults and
validators, and reports all violations at once, keyed by field.  Users of its
Admin API rely on that error shape, so we keep the same model: a L{Field}
tree, one L{validate} walk that fills defaults and collects every error, and
messages worded as Kong words them.

Values arrive either as JSON (types must match) or from a form body, where
everything is a string: with C{coerce=True} strings are converted to the
field's type, and a lone value for an array field becomes a one-element list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

Errors = dict[str, Any]
Check = Callable[[Any], "str | None"]

_REQUIRED = object()
# ASCII digits only (\d takes every script's), and \Z rather than $, which
# also matches before a final newline.
_INTEGER = re.compile(r"-?[0-9]+\Z")
# Integers a JSON client reads back exactly, and that int() parses without
# CPython's limit on long digit strings getting in the way.
_LARGEST = 2**53


@attrs.frozen
class Field:
    """
    One field of an entity.

    @ivar type: C{string}, C{integer}, C{number}, C{boolean}, C{array},
        C{record} or C{map} (string keys to string values).
    @ivar default: the value used when the field is absent or null;
        L{REQUIRED} makes the field mandatory.  Records default to the
        defaults of their fields.
    @ivar check: an extra validator returning an error message or L{None}.
    """

    type: str
    default: Any = None
    between: tuple[float, float] | None = None
    one_of: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    elements: Field | None = None
    fields: Mapping[str, Field] | None = None
    check: Check | None = None
    unique: bool = False


REQUIRED = _REQUIRED


# What RFC 3986 allows in a path (and a query after it): unreserved and
# reserved characters, and percent-escapes.  Nothing here can end a request
# line or a header early.
_URI_PATH = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*\Z")
# RFC 9110's token: a header or cookie name.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# Control characters other than HTAB cannot be sent in a header value; CR
# and LF would start a new header (response splitting).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def absolute_path(value: str) -> str | None:
    """
    A check for fields that hold a URL path, sent as they are in request
    lines and headers.
    """
    if not value.startswith("/"):
        return "should start with: /"
    if not _URI_PATH.match(value):
        return (
            f"invalid path: {value!r} (characters outside of the reserved list "
            "of RFC 3986 found)"
        )
    return None


def token(value: str) -> str | None:
    """
    A check for fields that hold a header or cookie name.
    """
    return None if _TOKEN.match(value) else f"invalid header or cookie name: {value!r}"


# Headers that frame the message or describe the connection: the gateway
# writes them itself, and a second Content-Length or Transfer-Encoding next
# to its own would let the target read the body differently (smuggling).
_FRAMING = frozenset(
    {
        "connection",
        "content-length",
        "expect",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def header_map(value: Mapping[str, str]) -> str | None:
    """
    A check for maps of header names to values that the gateway sends.
    """
    for name, content in value.items():
        if not _TOKEN.match(name):
            return f"invalid header name: {name!r}"
        if name.lower() in _FRAMING:
            return f"header {name!r} is set by the gateway itself"
        if _CONTROL.search(content):
            return f"invalid value for header {name!r}: control characters"
    return None


def no_controls(value: str) -> str | None:
    """
    A check for free-form strings that end up in headers, logs or labels.
    """
    return "control characters are not allowed" if _CONTROL.search(value) else None


def record(**fields: Field) -> Field:
    """
    A nested record field, whose default is built from its fields' defaults.
    """
    return Field("record", fields=fields)


def defaults(fields: Mapping[str, Field]) -> dict[str, Any]:
    """
    The value of a record with every field at its default.
    """
    value, _ = validate(fields, {})
    return value


def validate(
    fields: Mapping[str, Field], data: Mapping[str, Any], coerce: bool = False
) -> tuple[dict[str, Any], Errors]:
    """
    Check C{data} against C{fields}, filling in defaults.

    @return: the normalised value and a (possibly empty) tree of error
        messages, one per offending field, shaped like the data.
    """
    errors: Errors = {}
    result: dict[str, Any] = {}
    if not isinstance(data, Mapping):
        return {}, {"@entity": "expected a record"}
    for name in data:
        if name not in fields:
            errors[name] = "unknown field"
    for name, field in fields.items():
        value, error = _field(field, data.get(name), coerce)
        if error is not None:
            errors[name] = error
        else:
            result[name] = value
    return result, errors


def _field(field: Field, value: Any, coerce: bool) -> tuple[Any, Any]:
    if coerce and value == "":
        # A form cannot say null: an empty value clears the field (back to
        # its default), as Kong reads forms; a JSON "" stays an error.
        value = None
    if value is None:
        if field.default is _REQUIRED:
            return None, "required field missing"
        if field.type == "record":
            assert field.fields is not None
            return defaults(field.fields), None
        if isinstance(field.default, (list, dict)):
            return type(field.default)(field.default), None
        return field.default, None
    value, error = _typed(field, value, coerce)
    if error is None:
        error = _constraints(field, value)
    return value, error


def _typed(field: Field, value: Any, coerce: bool) -> tuple[Any, Any]:
    kind = field.type
    if kind == "string":
        if not isinstance(value, str):
            return None, "expected a string"
        if value == "":
            return None, "length must be at least 1"
        return value, None
    if kind == "integer":
        if coerce and isinstance(value, str) and _INTEGER.match(value.strip()):
            if len(value.strip().lstrip("-")) > 16:
                return None, _OUT_OF_RANGE
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            # JSON's 100.0 and 1e3, as Kong (whose numbers are doubles) reads
            # them.
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return None, "expected an integer"
        if not -_LARGEST <= value <= _LARGEST:
            return None, _OUT_OF_RANGE
        return value, None
    if kind == "number":
        if coerce and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None, "expected a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, "expected a number"
        return value, None
    if kind == "boolean":
        if coerce and isinstance(value, str) and value.lower() in _BOOLEANS:
            value = _BOOLEANS[value.lower()]
        if not isinstance(value, bool):
            return None, "expected a boolean"
        return value, None
    if kind == "array":
        return _array(field, value, coerce)
    if kind == "record":
        if not isinstance(value, Mapping):
            return None, "expected a record"
        assert field.fields is not None
        result, errors = validate(field.fields, value, coerce)
        return result, (errors or None)
    if kind == "map":
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return None, "expected a map of strings"
        return dict(value), None
    raise ValueError(f"unknown field type {kind!r}")


_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}
_OUT_OF_RANGE = f"value should be between -{_LARGEST} and {_LARGEST}"


def _array(field: Field, value: Any, coerce: bool) -> tuple[Any, Any]:
    if coerce and not isinstance(value, list):
        value = [value]
    if not isinstance(value, list):
        return None, "expected an array"
    assert field.elements is not None
    result = []
    for element in value:
        item, error = _field(field.elements, element, coerce)
        if error is not None:
            return None, error
        result.append(item)
    if field.unique and len(set(map(repr, result))) != len(result):
        return None, "elements must be unique"
    return result, None


def _constraints(field: Field, value: Any) -> str | None:
    if field.between is not None:
        low, high = field.between
        if not low <= value <= high:
            return f"value should be between {_num(low)} and {_num(high)}"
    if field.one_of is not None:
        choices = field.one_of() if callable(field.one_of) else field.one_of
        if value not in choices:
            return "expected one of: " + ", ".join(map(str, choices))
    if field.check is not None:
        return field.check(value)
    return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def flatten(errors: Errors, prefix: str = "") -> list[str]:
    """
    Render an error tree as Kong's C{"path.to.field: message"} strings.
    """
    lines = []
    for name, error in errors.items():
        path = f"{prefix}{name}"
        if isinstance(error, dict):
            lines.extend(flatten(error, path + "."))
        else:
            lines.append(f"{path}: {error}")
    return lines


def merge(
    fields: Mapping[str, Field], base: Mapping[str, Any], patch: Mapping[str, Any]
) -> dict[str, Any]:
    """
    Deep-merge C{patch} into C{base}, as Kong's PATCH does: records merge,
    everything else is replaced, arrays and maps included (a PATCH of a
    target's C{headers} is its whole new set, so one can be removed).
    """
    result = dict(base)
    for key, value in patch.items():
        old = result.get(key)
        field = fields.get(key)
        if (
            field is not None
            and field.fields is not None
            and isinstance(value, Mapping)
            and isinstance(old, Mapping)
        ):
            result[key] = merge(field.fields, old, value)
        else:
            result[key] = value
    return result
