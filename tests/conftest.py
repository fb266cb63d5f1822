import os

import pytest
import torch

from fastdiff.nn.unet import UNet, UNetConfig

TINY = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  dropout=0.0)


def pytest_sessionstart(session) -> None:
    """`make test` sets FASTDIFF_REQUIRE_EXTENSION=1: without the compiled kernels the op tests would
    compare the PyTorch reference with itself, so a missing fastdiff._C fails the run up front."""
    if os.environ.get("FASTDIFF_REQUIRE_EXTENSION", "").strip() != "1":
        return
    from fastdiff import ops

    if ops.backend() != "extension":
        reason = getattr(ops, "_IMPORT_ERROR", None)
        pytest.exit(
            "FASTDIFF_REQUIRE_EXTENSION=1 but fastdiff._C is not in use (fastdiff.ops.backend() == "
            f"{ops.backend()!r}; import error: {reason}). Build it with "
            "`pip install --no-build-isolation -e .`, or unset FASTDIFF_REQUIRE_EXTENSION to test the "
            "PyTorch fallback.",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a small
    shared CPU, torch's thread pool spin-waits under contention and runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- global torch state: a test that changes it fails, and the state is put back --------------------
def _torch_state() -> dict:
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
    }


def _restore(state: dict) -> None:
    torch.set_num_threads(state["torch.get_num_threads()"])
    torch.set_default_dtype(state["torch.get_default_dtype()"])
    torch.set_grad_enabled(state["torch.is_grad_enabled()"])
    torch.use_deterministic_algorithms(state["torch.are_deterministic_algorithms_enabled()"])


@pytest.fixture(autouse=True)
def _no_leaked_torch_state(request):
    before = _torch_state()
    yield
    after = _torch_state()
    if after != before:
        _restore(before)
        changed = ", ".join(f"{k}: {before[k]} -> {after[k]}" for k in before if after[k] != before[k])
        pytest.fail(f"{request.node.nodeid} leaked global torch state ({changed}); restored it for the "
                    "next tests. Restore it in the code or the test (try/finally).", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory):
    """The engine's ONNX export cache (fastdiff.runtimes) in a per-session folder, not ~/.cache/fastdiff."""
    if os.environ.get("FASTDIFF_CACHE"):
        yield
        return
    os.environ["FASTDIFF_CACHE"] = str(tmp_path_factory.mktemp("fastdiff-cache"))
    try:
        yield
    finally:
        os.environ.pop("FASTDIFF_CACHE", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY).eval()
