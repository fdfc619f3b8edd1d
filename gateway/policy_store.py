"""Policy files: reading `policies/*.yaml` into a frozen `PolicySet`.

Owns the schema of a policy file (pydantic, strict, unknown keys are errors) and loading a whole folder: every
problem in every file is collected and reported at once, each naming file, key path and line. An app named in two
files is an error. Reloading (validate, then swap) builds on `load_policies`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pydantic
from pydantic import AfterValidator, Field

from gateway.config import Config, Model
from gateway.core.names import is_app_id, is_channel
from gateway.core.policy import AppPolicy, Channels, PolicySet
from gateway.errors import ConfigError, ConfigIssue
from gateway.yamlsrc import read_yaml, validation_issues


def _app_id(value: str) -> str:
    if not is_app_id(value):
        raise ValueError(f"app_id must be a reverse-domain name like com.example.app, got {value!r}")
    return value


def _channel(value: str) -> str:
    if not is_channel(value):
        raise ValueError(f"not a valid channel name: {value!r}")
    return value


ChannelName = Annotated[str, AfterValidator(_channel)]


class ChannelsModel(Model):
    default: ChannelName = "production"
    allowed: list[ChannelName] = []

    @pydantic.model_validator(mode="after")
    def _default_allowed(self) -> ChannelsModel:
        if self.allowed and self.default not in self.allowed:
            raise ValueError(f"default channel {self.default!r} is not in allowed")
        return self


class AppModel(Model):
    app_id: Annotated[str, AfterValidator(_app_id)]
    origin: str
    channels: ChannelsModel = ChannelsModel()


class PolicyFile(Model):
    apps: Annotated[list[AppModel], Field(min_length=1)]


def load_policies(folder: Path, config: Config) -> PolicySet:
    """Read every `*.yaml` in `folder`; raise `ConfigError` listing every problem in every file."""
    files = sorted(p for p in folder.glob("*.yaml") if p.is_file())
    files += sorted(p for p in folder.glob("*.yml") if p.is_file())
    issues: list[ConfigIssue] = []
    apps: dict[str, AppPolicy] = {}
    where: dict[str, str] = {}
    if not files:
        raise ConfigError.single(str(folder), "", None, "no policy files (*.yaml) in this folder")
    for path in files:
        try:
            doc = read_yaml(path)
        except ConfigError as exc:
            issues.extend(exc.issues)
            continue
        try:
            parsed = PolicyFile.model_validate(doc.data)
        except pydantic.ValidationError as exc:
            issues.extend(validation_issues(doc, exc))
            continue
        for i, app in enumerate(parsed.apps):
            key = ("apps", i)
            if app.origin not in config.origins:
                known = ", ".join(sorted(config.origins))
                issues.append(doc.issue((*key, "origin"), f"unknown origin {app.origin!r} (configured: {known})"))
            if app.app_id in apps:
                issues.append(
                    doc.issue((*key, "app_id"), f"app {app.app_id} is already defined in {where[app.app_id]}")
                )
                continue
            allowed = tuple(app.channels.allowed) or (app.channels.default,)
            apps[app.app_id] = AppPolicy(
                app_id=app.app_id,
                origin=app.origin,
                channels=Channels(app.channels.default, allowed),
                source=str(path),
            )
            where[app.app_id] = f"{path}:{doc.line_of(key)}"
    if issues:
        raise ConfigError(issues)
    return PolicySet(apps)
