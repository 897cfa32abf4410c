"""The README's Python API example runs as written."""

import re

from tests.conftest import REPO


def test_readme_api_example(capsys):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- example: api -->\s*```python\n(.*?)```", text, re.S)
    assert block, "the README lost its API example"
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert "quantizers calibrated in" in capsys.readouterr().out


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (REPO / "README.md").read_text()
