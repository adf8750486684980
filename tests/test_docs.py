"""The documentation's examples run: README code blocks and docstring examples."""

from __future__ import annotations

import doctest
import pathlib
import re

import pytest
import tokenmix
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize(
    "doc",
    [
        "README.md",
        "docs/neighborhood_attention.md",
        "docs/simt_emulator.md",
        "docs/cuda_engine.md",
        "docs/block_sparse_attention.md",
        "docs/patterns.md",
        "docs/compat.md",
        "docs/distributed.md",
        "docs/fft_mixing.md",
    ],
)
def test_markdown_python_blocks_run(doc):
    blocks = _python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, f"{doc}:example", "exec"), namespace)


def test_readme_example_outputs():
    # The README example's results have the documented shapes and gradients.
    namespace: dict = {}
    exec(compile(_python_blocks(ROOT / "README.md")[0], "README.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 32, 32, 4, 64)
    assert namespace["lse"].shape == (2, 32, 32, 4)
    assert namespace["q"].grad is not None and torch.isfinite(namespace["q"].grad).all()
    assert namespace["y"].shape == (2, 32, 32, 256)


@pytest.mark.parametrize(
    "module",
    [
        tokenmix.neighborhood.functional,
        tokenmix.block_sparse.functional,
        tokenmix.block_sparse.layout,
        tokenmix.block_sparse.modules,
        tokenmix.patterns.windows,
        tokenmix.patterns.offsets,
        tokenmix.patterns.video,
        tokenmix.patterns.documents,
        tokenmix.patterns.modules,
        tokenmix.distributed.sharding,
        tokenmix.fft_mix.functional,
        tokenmix.fft_mix.modules,
        tokenmix._memory,
    ],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(module, module.__name__)
    examples = sum(len(t.examples) for t in tests)
    assert examples > 0
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
