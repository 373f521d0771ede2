"""Errors the CLI turns into a short message and an exit code (never a traceback)."""

from __future__ import annotations


class VpoError(Exception):
    """Base class: ``str(err)`` is the whole user-facing message; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class SpecError(VpoError):
    """Invalid spec (exit 2) or a part whose plugin is missing or broken (exit 3)."""

    def __init__(self, message: str, path: str = "", line: int | None = None, exit_code: int = 2):
        self.message = message
        self.path = path
        self.line = line
        self.exit_code = exit_code
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.path:
            where = self.path
        if self.line is not None:
            where = f"{where} (line {self.line})" if where else f"line {self.line}"
        return f"{where}: {self.message}" if where else self.message


class SpecErrors(VpoError):
    """Several spec problems reported at once."""

    def __init__(self, errors: list[SpecError], source: str = ""):
        self.errors = errors
        self.exit_code = max(e.exit_code for e in errors)
        head = f"invalid spec {source}" if source else "invalid spec"
        body = "\n".join(f"  - {e.format()}" for e in errors)
        super().__init__(f"{head}:\n{body}")


class PluginError(VpoError):
    exit_code = 3


class RunError(VpoError):
    """A failure while running (exit 1) that has a clear cause, e.g. too many non-finite steps."""

    exit_code = 1


class PluginFault(RunError):
    """A plugin broke its contract or raised (then chained to what it raised: its traceback goes to error.log)."""
