"""The README's Python API example runs as written."""

import re

from tests.conftest import REPO


import pytest


@pytest.mark.parametrize(("name", "prints"), [("api", "quantizers calibrated in"),
                                              ("custom", "custom network: 5 quantizers calibrated, samples (2, 3, 16, 16)"),
                                              ("conditional", "16 calibration inputs (uncond + cond), latents (2, 4, 8, 8)"),
                                              ("vae", "VAE decoder: 38 quantizers calibrated")])  # custom: 3 x (weight, input), x_t not
def test_readme_python_examples_run_as_written(name, prints, capsys):
    text = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert block, f"the README lost its {name} example"
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert prints in capsys.readouterr().out


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (REPO / "README.md").read_text()
