import pytest
import torch

torch.set_num_threads(1)

_REPORT: list[str] = []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def report(request):
    """Lines printed in the test summary (learning results worth recording in CI logs). They ride on
    the test report's user_properties, which pytest-xdist carries from its workers to the controller."""
    return lambda line: request.node.user_properties.append(("learning result", line))


def pytest_runtest_logreport(report):
    if report.when == "call":
        _REPORT.extend(line for key, line in report.user_properties if key == "learning result")


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("learning results")
        for line in _REPORT:
            terminalreporter.write_line(line)
