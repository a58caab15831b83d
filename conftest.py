"""Test-wide settings (tests and doctests): no test leans on the default model.

The default (qwen2.5-coder-0.5b) is a 0.5 GB install that a clean checkout does not have, so a test that needs a
model names one (``tiny_model()``, ``--model DIR``, ``Model.load("smollm2-135m")``); here the default points at
a name that does not exist, so leaning on it fails loudly instead of downloading. A test of the default itself
removes ``KVMAS_MODEL`` with ``monkeypatch``.
"""

import pytest

NO_DEFAULT = "tests-name-their-model"


@pytest.fixture(autouse=True)
def _no_default_model(monkeypatch):
    monkeypatch.setenv("KVMAS_MODEL", NO_DEFAULT)
