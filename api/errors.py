"""Errors in the API's own shapes."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError


def invalid_field(
    field: str, message: str, value: Any = None, where: str = "body"
) -> RequestValidationError:
    """The same 422 shape FastAPI gives for schema errors, for checks the schema cannot do."""
    return RequestValidationError(
        [{"type": "value_error", "loc": (where, field), "msg": message, "input": value}]
    )
