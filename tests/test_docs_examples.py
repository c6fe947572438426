"""Every ```python block of README.md and docs/*.md runs as written.

One test per Markdown file: its blocks run in order in one namespace (a later block
uses what an earlier one defined), in a temporary working directory that links the
repository's ``data/``, so that the blocks' paths resolve as from the repository
root and the files they write go nowhere else. A block marked ``<!-- not run:
REASON -->`` (a GPU, ``torchrun``, a user's own files) or ``<!-- tested in
tests/FILE.py -->`` is compiled, not run; see :class:`conftest.DocBlock`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from curvkit.plugins.kfac import KFACLayerRule

from curvkit.layers import LayerRule

REPO = Path(__file__).resolve().parents[1]
# Over two seconds on 2 CPU cores: README.md 3.4 s, solvers.md 5.8 s (LiSSA's 4,000 products).
SLOW = {"README.md", "solvers.md"}
DOCS = [
    pytest.param(path, id=path.name, marks=[pytest.mark.slow] if path.name in SLOW else [])
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    if "```python" in path.read_text()
]


def _kfac_layer_rule_plugin_builds_its_rules(namespace: dict, printed: str) -> None:
    """The layer-rule plugin of docs/kfac.md builds the rules the kfac plugin takes."""
    namespace["MyLayer"] = torch.nn.Linear  # the user's layer class
    (rule,) = namespace["curvkit_kfac_layer_rules"]()
    assert isinstance(rule, KFACLayerRule) and isinstance(rule.rule, LayerRule)


def _the_results_file_written_is_read_back(namespace: dict, printed: str) -> None:
    """docs/hdf5-schema.md writes a run, then reads it: the run is complete."""
    assert f"{namespace['run_id']} complete epoch_3.pt" in printed


# What a file's blocks claim beyond running, checked after its last block.
CLAIMS: dict[str, Callable[[dict, str], None]] = {
    "kfac.md": _kfac_layer_rule_plugin_builds_its_rules,
    "hdf5-schema.md": _the_results_file_written_is_read_back,
}


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.filterwarnings("ignore:solver 'cg' needs A \\+ damping I positive definite")
@pytest.mark.parametrize("doc", DOCS)
def test_the_python_blocks_run_as_written(doc, python_blocks, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__main__"}
    for block in python_blocks(doc):
        code = block.compile()  # a block that is not run still parses
        if block.not_run is not None:
            assert block.not_run, f"{block.location}: say why the block is not run"
        elif block.tested_in is not None:
            test = REPO / block.tested_in
            assert test.is_file(), f"{block.location}: no {block.tested_in}"
            assert doc.name in test.read_text(), f"{block.location}: {block.tested_in} never names {doc.name}"
        else:
            exec(code, namespace)  # noqa: S102 - our own docs
    CLAIMS.get(doc.name, lambda namespace, printed: None)(namespace, capsys.readouterr().out)
