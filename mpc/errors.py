"""User-facing errors: bad input, impossible options, missing files.

The CLI prints these as one line (no traceback) and exits non-zero. Library code raises
them for anything a user can fix; programming errors stay ordinary exceptions.
"""


class UserError(Exception):
    """An error caused by the user's input; its message names the problem."""


class DataError(UserError):
    """Bad data: the message names the file, line, field and value where known."""

    def __init__(self, message: str, *, path=None, line=None, row=None, field=None, value=None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if line is not None:
            parts.append(f"line {line}")
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field {field}")
        where = ", ".join(parts)
        text = f"{where}: {message}" if where else message
        if value is not None:
            text += f" (value {value!r})"
        super().__init__(text)
        self.path, self.line, self.row, self.field, self.value = path, line, row, field, value
