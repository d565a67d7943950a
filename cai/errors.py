"""The one error type that reaches users as a single line and exit code 2."""


class UserError(Exception):
    """Bad input: a file, key or value the user can fix. The CLI prints it on one line and exits 2."""


def where(path, line: int | None = None) -> str:
    """`file:line` (or just `file`) for error messages."""
    return f"{path}:{line}" if line else str(path)
