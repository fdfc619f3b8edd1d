"""Shared fixtures: the test PKI (made once per session) and the Capgo fixtures path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.origin_server import HttpsOrigin
from tests.support import CAPGO_FIXTURES, Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def https_origin(tmp_path: Path) -> Iterator[HttpsOrigin]:
    with HttpsOrigin(tmp_path) as origin:
        yield origin


@pytest.fixture(scope="session")
def capgo_dir() -> Path:
    if not (CAPGO_FIXTURES / "fixtures.json").exists():
        pytest.fail(f"Capgo fixtures missing at {CAPGO_FIXTURES}")
    return CAPGO_FIXTURES
