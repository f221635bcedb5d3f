"""What an installed rtlynx needs at run time is inside the package (wheels too)."""

from pathlib import Path

import rtlynx


def test_kernel_sources_and_assets_are_in_the_package():
    from rtlynx.ops import _build

    pkg = Path(rtlynx.__file__).parent
    assert _build.CSRC == pkg / "csrc"  # not only the repository's csrc/
    assert sorted(p.name for p in _build.CSRC.glob("*.cu"))  # the sources nvcc builds at first use
    assert (_build.CSRC / "rtlynx_sm90.h").is_file()
    assert sorted((pkg / "assets" / "miniflux").glob("model-*.safetensors"))
    assert (pkg / "assets" / "miniflux-lynx" / "rtlynx_lora.safetensors").is_file()
