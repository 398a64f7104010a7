import pytest
import torch

torch.set_num_threads(1)

_REPORT: list[str] = []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def report():
    """Lines printed in the test summary (learning results worth recording in CI logs)."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("learning results")
        for line in _REPORT:
            terminalreporter.write_line(line)
