"""The `>>>` examples in library docstrings are executed: an example whose
printed value is wrong fails here. Add a module to `MODULES` to cover it."""

import doctest
import importlib

import pytest

MODULES = [
    "jaxalign.losses.advantages",
    "jaxalign.losses.aggregation",
    "jaxalign.losses.group",
    "jaxalign.losses.importance",
    "jaxalign.losses.kl",
    "jaxalign.losses.ppo",
    "jaxalign.losses.preference",
    "jaxalign.losses.sequence",
    "jaxalign.losses.sft",
    "jaxalign.losses.terms",
    "jaxalign.models.logprobs",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=flags)
    tests = [t for t in finder.find(module) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} failing docstring example(s) in {name} (printed above)"
    # A module on the list is there because it has examples: losing them all
    # (say, a docstring reformatted into comments) should not pass silently.
    assert result.attempted > 0, f"{name} has no docstring examples"
