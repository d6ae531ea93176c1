"""The domain's one error for a bad request: which field, and what is wrong with it."""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A request field is invalid; raised where the problem is found.

    `field` names the offending request field (as the API spells it, e.g. `text`,
    `requests[2].threshold`); the servicer maps this error to INVALID_ARGUMENT with that field.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def nested(self, prefix: str) -> InvalidArgument:
        """The same error for a field inside `prefix` (e.g. an item of a batch)."""
        return InvalidArgument(f"{prefix}.{self.field}", self.message)


QUOTE_CHARS = 40
"""How much of a caller's value an error message quotes."""


def prefix(text: str, limit: int = QUOTE_CHARS) -> str:
    """A caller's string as a log field or a field name shows it: whole when short, else its
    first `limit` characters and its length (`quote` is the same, for error messages)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr` of a caller's value, cut to a short prefix: error messages, their details and the
    logs never echo a request's value whole (a 1 MB policy name must not make a 1 MB error)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}... ({len(text)} characters)"
