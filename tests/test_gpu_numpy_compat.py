"""``training/safe_load.py`` imports under numpy 1.26 (setup.py allows numpy >= 1.26).

numpy 1.26 does not import its ``numpy._core`` stub package (nor that package's
``multiarray``) on ``import numpy``, so reading ``np._core.multiarray`` as an attribute raised
``AttributeError: module 'numpy._core' has no attribute 'multiarray'`` at import (measured with
the numpy 1.26.4 wheel). The test reproduces that module state on the installed numpy: the
submodule is loaded but not bound as an attribute of its package.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import subprocess_env

NUMPY_126_LAYOUT = textwrap.dedent(
    """
    import numpy, sys
    for pkg in ("numpy._core", "numpy.core"):
        mod = sys.modules.get(pkg)
        if mod is not None and "multiarray" in vars(mod):
            delattr(mod, "multiarray")  # loaded, not an attribute: numpy 1.26 after import
    import megatron_qk.training.safe_load as safe_load
    reconstruct = safe_load.NUMPY_RNG_GLOBALS[0][0]
    assert reconstruct is sys.modules["numpy._core.multiarray"]._reconstruct, reconstruct
    print("ok")
    """
)


def test_safe_load_imports_when_numpy_core_multiarray_is_no_attribute():
    proc = subprocess.run(
        [sys.executable, "-c", NUMPY_126_LAYOUT],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
