"""OpenBLAS kernel choice (mlx_flash.blas): named only where OpenBLAS fell back to pre-AVX2 kernels."""

import pytest

from mlx_flash.blas import AVX512, core_type, kernels_for

AVX2 = {"sse3", "avx", "avx2", "fma"}


@pytest.mark.parametrize("core, flags, expected", [
    ("Prescott", AVX2 | AVX512, "SkylakeX"),  # OpenBLAS 0.3.21 on Emerald Rapids
    ("Prescott", AVX2, "Haswell"),
    ("Nehalem", AVX2 | {"avx512f"}, "Haswell"),  # AVX-512 without the subsets OpenBLAS's SkylakeX kernels use
    ("Prescott", {"sse3"}, None),  # a CPU without AVX2: OpenBLAS's choice stands
    ("SkylakeX", AVX2 | AVX512, None),
    ("Haswell", AVX2 | AVX512, None),  # an AVX2 choice on an AVX-512 CPU (e.g. Zen 4) is left alone
    ("Zen", AVX2, None),
])
def test_kernels_for(core, flags, expected):
    assert kernels_for(core, flags) == expected


def test_core_type_of_a_library_that_is_not_openblas(tmp_path):
    assert core_type(str(tmp_path / "missing.so")) is None
    assert core_type("libc.so.6") is None  # loads, but has no openblas_get_corename
