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
