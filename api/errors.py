"""Errors in the API's own shapes."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

log = logging.getLogger("sluice.api")


def invalid_field(
    field: str, message: str, value: Any = None, where: str = "body"
) -> RequestValidationError:
    """The same 422 shape FastAPI gives for schema errors, for checks the schema cannot do."""
    return RequestValidationError(
        [{"type": "value_error", "loc": (where, field), "msg": message, "input": value}]
    )


def unavailable(what: str, error: BaseException) -> HTTPException:
    """A 503 that names what is down, never the error itself: its text (hosts, ports, a
    driver's message) is for the logs, and some of these answer callers not yet authenticated."""
    log.warning("%s: %s: %s", what, type(error).__name__, error)
    return HTTPException(503, f"{what}; retry shortly", headers={"Retry-After": "1"})
