"""numba's cache=True notices edits to a kernel's own file only; qtool.kernels drops the compiled cache when a
module whose functions other kernels inline changes, so a `git pull` never leaves stale machine code behind."""
from __future__ import annotations

import importlib.util
import shutil
import sys

from conftest import REPO


def test_cache_is_dropped_when_a_shared_kernel_source_changes(tmp_path):
    pkg = tmp_path / "kernels"
    shutil.copytree(REPO / "kernels", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location("kernels_copy", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels_copy"] = module  # importlib's recipe: a package's relative imports look it up there
    try:
        _check(module, pkg)
    finally:
        for name in [n for n in sys.modules if n == "kernels_copy" or n.startswith("kernels_copy.")]:
            del sys.modules[name]


def _check(module, pkg) -> None:
    module.__spec__.loader.exec_module(module)  # first import: stamps the sources
    compiled = pkg / "__pycache__" / "q8_0.quantize-12.py311.nbi"
    compiled.write_bytes(b"x")
    module._drop_stale_cache()
    assert compiled.exists()  # sources unchanged: the cache stays
    for shared in module._SHARED_SOURCES:  # an edit to any module others inline from drops it
        with open(pkg / shared, "a") as f:
            f.write("\n# edited\n")
        module._drop_stale_cache()
        assert not compiled.exists(), shared
        compiled.write_bytes(b"x")
    (pkg / "q8_0.py").write_text((pkg / "q8_0.py").read_text() + "\n# numba itself notices this one\n")
    module._drop_stale_cache()
    assert compiled.exists()
