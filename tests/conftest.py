import logging

import pytest


@pytest.fixture(autouse=True)
def _quiet_blockzoo_logs(caplog):
    caplog.set_level(logging.WARNING, logger="blockzoo")
    yield
