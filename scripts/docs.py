"""Build the API documentation of ``nsa`` with pdoc, offline: ``python scripts/docs.py [OUT]``.

Every public module of the package gets a page (names with a leading underscore are private,
``nsa.bench.__main__`` included). pdoc follows a package's ``__all__`` when it lists
submodules, so each module is named once: those its parent already covers are not repeated
(pdoc warns about a module added twice). Docstrings are Google style (``Args:``, ``Returns:``).
``make docs`` runs this into build/docs; tests/test_packaging.py checks it builds without warnings.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
import warnings
from pathlib import Path


def public_modules(package: str = "nsa") -> list[str]:
    """The modules to hand to pdoc, parents first, none covered twice."""
    import importlib

    import pdoc.extract

    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")
                         if not any(part.startswith("_") for part in m.name.split("."))]
    if importlib.util.find_spec("transformers") is None:
        names.remove(f"{package}.hf")  # the optional integration (nsa[hf]) needs transformers to import
    specs, covered = [], set()
    for name in names:
        if name not in covered:
            specs.append(name)
            covered.update(pdoc.extract.walk_specs([name]))
    return specs


def main(argv: list[str]) -> int:
    import pdoc
    import pdoc.render

    out = Path(argv[0] if argv else "build/docs")
    # the kernel modules import triton; on a machine without a GPU they need the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
    pdoc.render.configure(docformat="google", search=True, show_source=True)
    modules = public_modules()
    with warnings.catch_warnings():
        # transformers' PreTrainedModel.kernels_mode (inherited by nsa.hf.NSAForCausalLM) has an
        # annotation that transformers' own imports cannot resolve: not ours to document.
        warnings.filterwarnings("ignore", message=r".*annotation.* for nsa\.hf\.NSAForCausalLM\.kernels_mode",
                                category=UserWarning)
        pdoc.pdoc(*modules, output_directory=out)
    print(f"wrote {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
