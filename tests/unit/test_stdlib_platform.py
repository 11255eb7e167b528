"""platform/ is a source root, not a package: `import platform` must stay the standard library."""

import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOT = REPO / "platform"


def test_source_root_has_no_init():
    assert not (SOURCE_ROOT / "__init__.py").exists()


def test_import_platform_is_the_standard_library():
    assert platform.python_implementation() in {"CPython", "PyPy"}
    assert not Path(platform.__file__).resolve().is_relative_to(SOURCE_ROOT)


def test_import_platform_from_the_repo_root_is_the_standard_library():
    # A fresh interpreter with the repo root first on sys.path, as `python -m ...` run there has it,
    # is where a platform/__init__.py would shadow the standard library.
    code = "import platform; print(platform.__file__); print(platform.python_implementation())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    module_file, implementation = result.stdout.split("\n")[:2]
    assert not Path(module_file).resolve().is_relative_to(SOURCE_ROOT)
    assert implementation
