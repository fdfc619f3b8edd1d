"""Errors a user sees: configuration errors that name the file, key path and line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one file: `file:line: key.path: message`."""

    source: str
    key_path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        key = f" {self.key_path}:" if self.key_path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(Exception):
    """One or more configuration problems; `str()` gives one line per problem."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        if not issues:
            raise ValueError("ConfigError needs at least one issue")
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))

    @classmethod
    def single(cls, source: str, key_path: str, line: int | None, message: str) -> ConfigError:
        return cls([ConfigIssue(source, key_path, line, message)])
