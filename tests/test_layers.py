"""The layers really are layers: lower ones import without the ones above them."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Makes a package unimportable inside the child interpreter before anything else is imported.
_BLOCK = """
import sys
class _Block:
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"layer violation: {{name}} imported")
sys.meta_path.insert(0, _Block({blocked!r}))
{code}
"""


def _imports(code: str, blocked: set[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK.format(blocked=blocked, code=code)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow  # three fresh interpreters importing torch and transformers
@pytest.mark.parametrize(
    ("code", "blocked"),
    [
        (
            "import core.config, core.trial, core.errors, core.rows, core.eval, core.store, core.objectives",
            {"sweeps", "runners", "objectives"},
        ),
        (
            (
                "import runners.sft, runners.data, runners.models, objectives.registry, objectives.gsm8k, "
                "objectives.ndcg, objectives.eval_loss, objectives.rouge, objectives.generation"
            ),
            {"sweeps"},
        ),
        (
            "import objectives.gsm8k, objectives.ndcg, objectives.eval_loss, objectives.rouge",
            {"sweeps", "runners"},
        ),
    ],
    ids=["core-alone", "runners-and-objectives-without-sweeps", "objectives-without-runners"],
)
def test_a_layer_imports_without_the_layers_above_it(code: str, blocked: set[str]) -> None:
    result = _imports(code, blocked)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
