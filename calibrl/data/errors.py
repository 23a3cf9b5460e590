"""Errors of the data reader, shared by format detection (`calibrl.data.layout`) and reading
(`calibrl.data.reader`), which re-exports them."""

from __future__ import annotations


class DataError(ValueError):
    """A bad file or row. `row` is the 0-based row index within the file (None: the whole file)."""

    def __init__(self, path: str, row: int | None, field: str, message: str, reason: str = "invalid"):
        self.path, self.row, self.field, self.reason = path, row, field, reason
        where = f"{path} row {row}" if row is not None else str(path)
        super().__init__(f"{where}, field '{field}': {message}")


class BadRow(Exception):
    """Raised inside row conversion; turned into a DataError with the file and row attached."""

    def __init__(self, field: str, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message
