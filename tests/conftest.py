"""Suite-wide fixtures: the seed and the device every test runs on.

The device comes from one place: ``pytest --device cpu|cuda|cuda:N|auto`` or, when the
option is not given, the environment variable ``TTCONV_TEST_DEVICE`` (default ``cpu``;
``auto`` is CUDA when available, else CPU). On a device other than the CPU an autouse
fixture makes it torch's default device for the duration of each test
(``torch.set_default_device``), so factory calls without a ``device=`` argument
(``torch.randn``, ``SVDConv(...)``, ``nn.Conv2d(...)``) land there and the whole suite runs
on it without a ``device=`` in every test. Tests marked ``@pytest.mark.cpu_only`` (numpy
oracles, pickles, subprocess CLI runs) keep the CPU. Tests that need the device by name
take the ``device`` fixture. On the CPU nothing is changed: torch's default device stays
unset (``set_default_device`` installs a function mode that every torch call pays for).
"""

import os
import sys

import pytest
import torch

# Make the shared oracle importable as a plain module from every test file.
sys.path.insert(0, os.path.dirname(__file__))

DEVICE_ENVIRONMENT_VARIABLE = "TTCONV_TEST_DEVICE"
_DEVICE_KEY = pytest.StashKey[torch.device]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=None,
        help="device the tests run on: cpu (default), cuda, cuda:N, or auto (cuda when available, else cpu); "
        f"without this option the environment variable {DEVICE_ENVIRONMENT_VARIABLE} is read",
    )


def resolve_device(text: str, source: str) -> torch.device:
    """The torch device named by ``text`` (from ``source``, for messages), or a usage error."""
    name = text.strip().lower()
    if name == "auto":
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu", source)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"{source}={text!r} is not a test device; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"{source}={text!r} but CUDA is not available (torch.cuda.is_available() is False); "
                "use cpu, or auto to take CUDA only where there is one"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise pytest.UsageError(
                f"{source}={text!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        if device.index is None:  # one name for the run: the current CUDA device
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def pytest_configure(config: pytest.Config) -> None:
    option = config.getoption("--device")
    if option is not None:
        device = resolve_device(option, "--device")
    else:
        device = resolve_device(os.environ.get(DEVICE_ENVIRONMENT_VARIABLE, "cpu"), DEVICE_ENVIRONMENT_VARIABLE)
    config.stash[_DEVICE_KEY] = device
    if device.type == "cuda":
        # The float32 tolerances assume IEEE float32 products; TF32 (on by default for cuDNN
        # convolutions) keeps 10 mantissa bits and would fail them for the wrong reason.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config: pytest.Config) -> str:
    device = config.stash[_DEVICE_KEY]
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"ttconv test device: {device}{name}"


@pytest.fixture(scope="session")
def session_device(pytestconfig: pytest.Config) -> torch.device:
    """The device named by ``--device`` / ``TTCONV_TEST_DEVICE`` (cpu by default)."""
    return pytestconfig.stash[_DEVICE_KEY]


@pytest.fixture
def device(request: pytest.FixtureRequest, session_device: torch.device) -> torch.device:
    """The device this test runs on: the session's, or the CPU for a ``cpu_only`` test."""
    if request.node.get_closest_marker("cpu_only") is not None:
        return torch.device("cpu")
    return session_device


@pytest.fixture(autouse=True)
def _default_device(device: torch.device):
    """torch's default device is the test's device for the test's duration (left unset on the CPU)."""
    if device.type == "cpu":
        yield
        return
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # every device's generator
    yield
