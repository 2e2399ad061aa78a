"""GPU tests are chosen by the ``gpu`` marker alone (``tests/conftest.py``).

Invariant: where no GPU can run them, a test marked ``gpu`` is skipped with the reason, and a test
that is not marked runs, even when one of its parameter ids is ``gpu`` (a keyword, not a marker;
matching keywords once skipped such tests everywhere).
"""

from __future__ import annotations

import pytest

import tests.conftest as root

pytest_plugins = ["pytester"]

CONFTEST = """
import tests.conftest as root

def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU")

pytest_collection_modifyitems = root.pytest_collection_modifyitems
"""

TESTS = """
import pytest

@pytest.mark.parametrize("device", ["cpu", "gpu"], ids=["cpu", "gpu"])
def test_unmarked_with_a_gpu_id(device):
    assert device in ("cpu", "gpu")

def test_gpu_named_but_unmarked():
    pass

@pytest.mark.gpu
def test_marked():
    pass

@pytest.mark.parametrize("n", [pytest.param(1, marks=pytest.mark.gpu, id="on-gpu"), pytest.param(2, id="on-cpu")])
def test_one_param_marked(n):
    pass

@pytest.mark.gpu
class TestMarkedClass:
    def test_inside(self):
        pass
"""


def test_the_marker_decides_what_is_skipped(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(root, "_no_gpu_reason", lambda: "needs an NVIDIA GPU (test)")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the inner runs need no plugins
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sample=TESTS)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    outcomes = {r.nodeid.split("::", 1)[1]: r.outcome for r in reports if r.when == "call" or r.skipped}
    assert outcomes == {
        "test_unmarked_with_a_gpu_id[cpu]": "passed",
        "test_unmarked_with_a_gpu_id[gpu]": "passed",
        "test_gpu_named_but_unmarked": "passed",
        "test_marked": "skipped",
        "test_one_param_marked[on-gpu]": "skipped",
        "test_one_param_marked[on-cpu]": "passed",
        "TestMarkedClass::test_inside": "skipped",
    }
    result.stdout.fnmatch_lines(["*SKIPPED*needs an NVIDIA GPU (test)*"])


def test_marked_tests_run_where_a_gpu_is(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(root, "_no_gpu_reason", lambda: None)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sample=TESTS)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=7)
