"""Make `mirrorfast` importable from a plain checkout (a GPU machine where the package is not pip-installed).

`kernels/` and `export/` are installed as `mirrorfast.kernels` and `mirrorfast.export`; from a checkout
they have to be mapped by hand.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"mirrorfast.kernels": "kernels", "mirrorfast.export": "export"}


def ensure_importable() -> None:
    try:
        for name in SUBPACKAGES:
            importlib.import_module(name)
        return
    except ImportError:
        pass
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name in [m for m in sys.modules if m == "mirrorfast" or m.startswith("mirrorfast.")]:
        del sys.modules[name]
    importlib.import_module("mirrorfast")
    for name, folder in SUBPACKAGES.items():
        spec = importlib.util.spec_from_file_location(
            name, ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


if __name__ == "__main__":
    from script_main import module_only

    sys.exit(module_only("from_checkout.py",
                         "the benchmark scripts import it to find mirrorfast in a plain checkout"))
