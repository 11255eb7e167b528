"""Session-wide real servers on 127.0.0.1 (see tests/servers.py)."""

from __future__ import annotations

import pytest

from tests import servers


@pytest.fixture(scope="session")
def s3_server():
    with servers.moto_s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
