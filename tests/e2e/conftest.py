"""The end-to-end tier's own fixture: a Ray head with its dashboard (the Jobs API) that the job
tests share."""

from __future__ import annotations

import pytest

from tests.helpers import free_port, ray_head


@pytest.fixture(scope="session")
def jobs_head(tmp_path_factory) -> str:
    """A Ray head with token auth and its dashboard on a port of its own; returns the dashboard's
    URL (the address ``ray job submit`` and ``orchestration.submit`` take)."""
    port = free_port()
    with ray_head(tmp_path_factory.mktemp("jobs-head"), dashboard_port=port):
        yield f"http://127.0.0.1:{port}"
