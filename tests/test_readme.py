"""The README's Python quickstart runs as written on the real default model."""

import re
from pathlib import Path

import pytest


@pytest.mark.integration
def test_readme_quickstart_runs(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    quickstart = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert "sl.load()" in quickstart and "sl.edit" in quickstart
    namespace: dict = {}
    exec(compile(quickstart, "README.md quickstart", "exec"), namespace)
    assert namespace["acts"]["blocks.10.attn.heads"].shape == (2, 9, 64)
    assert namespace["v"].shape == (576,)
    rec = namespace["rec"]  # recorded while generating: the last prompt token, then each fed token
    assert rec["final"].shape == (1, rec.calls, 576) and 1 <= rec.calls <= 20
    out = capsys.readouterr().out
    assert "Paris" in out  # the layer lens of "The capital of France is" ends on Paris
