"""Where the native build is required (CI: FASTSCALE_REQUIRE_NATIVE=1), the kernel tests in
test_ops_cpu.py must not be skipped: a failed build or load fails here instead."""

import os

import pytest

import fastscale


@pytest.mark.skipif(os.environ.get("FASTSCALE_REQUIRE_NATIVE", "") in ("", "0"),
                    reason="FASTSCALE_REQUIRE_NATIVE is not set")
def test_native_cpu_kernels_loaded():
    assert fastscale._extension.load(), fastscale.build_info()
    assert "cpu" in fastscale._extension.native_device_types(), fastscale.build_info()
