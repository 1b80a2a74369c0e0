"""The runnable examples in the public docstrings run (doctest), on the same backend as the other tests."""
import doctest
import importlib

import pytest

MODULES = ("nqkernels.codec", "nqkernels.paged", "nqkernels.attention.launcher", "nqkernels.delta", "nqkernels.cold",
           "nqkernels.scoring", "nqkernels.eviction", "integrations.flash")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_readme_layout_names_every_module():
    """The README's layout section names every module of the packages (so it keeps matching the tree)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme[readme.index("## Layout"):]
    block = block[block.index("```") + 3:]
    words = set(re.findall(r"[a-z_0-9]+", block[:block.index("```")]))
    missing = [str(p.relative_to(root)) for pkg in ("nqkernels", "autotune", "perf", "integrations")
               for p in sorted((root / pkg).rglob("*.py")) if p.stem != "__init__" and p.stem not in words]
    assert not missing, f"README.md's layout does not name {missing}"
