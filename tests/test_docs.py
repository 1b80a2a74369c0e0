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
