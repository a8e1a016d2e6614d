"""OpenBLAS kernel choice (mlx_flash.blas): named only where OpenBLAS runs kernels narrower than the CPU's."""

import pytest

from mlx_flash.blas import AVX512, core_type, kernels_for, narrow_kernels_note

AVX2 = {"sse3", "avx", "avx2", "fma"}


@pytest.mark.parametrize("core, flags, expected", [
    ("Prescott", AVX2 | AVX512, "SkylakeX"),  # OpenBLAS 0.3.21 on Emerald Rapids
    ("Prescott", AVX2, "Haswell"),
    ("Nehalem", AVX2 | {"avx512f"}, "Haswell"),  # AVX-512 without the subsets OpenBLAS's SkylakeX kernels use
    ("Prescott", {"sse3"}, None),  # a CPU without AVX2: OpenBLAS's choice stands
    ("SkylakeX", AVX2 | AVX512, None),
    ("Cooperlake", AVX2 | AVX512, None),  # OpenBLAS 0.3.21's own choice on an AVX-512 AMD EPYC
    ("Haswell", AVX2 | AVX512, "SkylakeX"),  # the AVX2 kernels on it: 1.85x slower (README, Linux CPU note)
    ("Zen", AVX2 | AVX512, "SkylakeX"),
    ("Zen", AVX2, None),
    ("Haswell", AVX2, None),
])
def test_kernels_for(core, flags, expected):
    assert kernels_for(core, flags) == expected


def test_a_narrow_core_set_by_the_user_gets_one_line():
    note = narrow_kernels_note("Haswell", AVX2 | AVX512)
    assert "\n" not in note and "OPENBLAS_CORETYPE=Haswell" in note and "SkylakeX" in note
    assert narrow_kernels_note("SkylakeX", AVX2 | AVX512) is None
    assert narrow_kernels_note("Haswell", AVX2) is None


def test_core_type_of_a_library_that_is_not_openblas(tmp_path):
    assert core_type(str(tmp_path / "missing.so")) is None
    assert core_type("libc.so.6") is None  # loads, but has no openblas_get_corename
