"""Exceptions raised by the schemas layer; each message names the file or field at fault."""


class SchemaError(ValueError):
    """A record or a file does not follow the vlp schema."""


class StoreError(RuntimeError):
    """A store directory cannot be read or written as asked."""
