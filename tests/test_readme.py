"""README.md is tested: every fenced ``bash`` and ``python`` block runs, in order, on the real default
model (python blocks in one namespace, bash blocks as ``steerlab`` commands in one scratch directory),
and a fenced ``text`` block right after a code block is its output: each of its lines must appear in
what the block prints, so a quoted number that drifts breaks the suite.

An HTML comment on the lines just before a fence adjusts it (the reason is part of the marker):

- ``<!-- readme-test: skip: REASON -->``: not run (too slow for the suite, needs the network...);
- ``<!-- readme-test: sub: OLD => NEW -->``: run with OLD replaced by NEW (smaller sizes);
- ``<!-- readme-test: drop: TEXT => REASON -->``: the command lines containing TEXT are not run.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(skip|sub|drop):\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    markers: list[tuple[str, str]] = field(default_factory=list)
    expected: str | None = None  # the text block that follows: its output

    def skip_reason(self) -> str | None:
        return next((arg for kind, arg in self.markers if kind == "skip"), None)

    def prepared(self) -> str:
        """The code as run: substitutions applied, dropped lines removed."""
        code = self.code
        for kind, arg in self.markers:
            if kind == "sub":
                old, new = (s.strip() for s in arg.split("=>", 1))
                if old not in code:
                    raise ValueError(f"README.md:{self.line}: sub marker's {old!r} is not in the block")
                code = code.replace(old, new)
        drops = [arg.split("=>", 1)[0].strip() for kind, arg in self.markers if kind == "drop"]
        return "\n".join(ln for ln in joined_lines(code) if not any(d in ln for d in drops))


def joined_lines(code: str) -> list[str]:
    """Lines of a shell block with backslash continuations joined."""
    out, cur = [], ""
    for ln in code.splitlines():
        if ln.rstrip().endswith("\\"):
            cur += ln.rstrip()[:-1] + " "
        else:
            out.append(cur + ln)
            cur = ""
    return out + ([cur] if cur else [])


def parse(text: str) -> list[Block]:
    """The fenced blocks of a markdown text with their markers and quoted output."""
    lines, blocks, pending, i = text.splitlines(), [], [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            found = MARKER.findall(lines[i])
            pending = pending + found if found else ([] if lines[i].strip() else pending)
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        block = Block(m.group(1), "\n".join(lines[i + 1:j]), i + 1, pending)
        pending = []
        if m.group(1) == "text" and blocks and blocks[-1].expected is None and blocks[-1].lang in ("bash", "python"):
            blocks[-1].expected = block.code
        else:
            blocks.append(block)
        i = j + 1
    return [b for b in blocks if b.lang in ("bash", "python")]


def flat(s: str) -> str:
    """Whitespace and rich's box characters collapsed (tables compare by their content)."""
    return " ".join(s.translate({ord(c): " " for c in "│┃╭╮╰╯─━┏┓┗┛┡┩╇┳┻┯┷═║"}).split())


def missing_lines(expected: str, output: str) -> list[str]:
    """The lines of ``expected`` (a quoted output) that ``output`` does not contain."""
    got = flat(output)
    return [ln for ln in expected.splitlines() if flat(ln) and flat(ln) not in got]


def run_bash(code: str) -> str:
    """Run each ``steerlab`` command of a shell block in process; raise with its output on failure."""
    from typer.testing import CliRunner

    from steerlab.cli import app

    out = []
    for ln in joined_lines(code):
        args = shlex.split(ln, comments=True)
        if not args:
            continue
        if args[0] != "steerlab":
            raise AssertionError(f"not a steerlab command (mark the block skip, with the reason): {ln}")
        r = CliRunner().invoke(app, args[1:])
        out.append(r.output)
        if r.exit_code != 0:
            raise AssertionError(f"`{ln.strip()}` exited {r.exit_code}:\n{r.output[-3000:]}\n{r.exception!r}")
    return "\n".join(out)


# --- the harness itself, on a small markdown text (fast) ---------------------------------------------
SAMPLE = """
<!-- readme-test: sub: --n 100 => --n 4 -->
```bash
steerlab generate --out x --n 100 \\
    -k 3   # a comment
steerlab demo
```
```text
| mean toxicity | 0.250 |
```

<!-- readme-test: skip: needs the network -->
```python
print(1)
```
<!-- readme-test: drop: steerlab demo => the 14-minute benchmark -->
```bash
steerlab models
steerlab demo
```
"""


def test_parser_markers_and_expected_output():
    a, b, c = parse(SAMPLE)
    assert (a.lang, a.line, a.expected) == ("bash", 3, "| mean toxicity | 0.250 |")
    assert [shlex.split(ln, comments=True) for ln in a.prepared().splitlines()] == [
        ["steerlab", "generate", "--out", "x", "--n", "4", "-k", "3"], ["steerlab", "demo"]]
    assert b.skip_reason() == "needs the network" and b.expected is None
    assert c.prepared() == "steerlab models" and c.skip_reason() is None
    assert missing_lines("┃ mean toxicity ┃ 0.250 ┃", "│ mean   toxicity │ 0.250 │ [0.1, 0.3]") == []
    assert missing_lines("| mean toxicity | 0.251 |", "│ mean toxicity │ 0.250 │") == ["| mean toxicity | 0.251 |"]
    with pytest.raises(ValueError, match="sub marker's '--n 7' is not in the block"):
        Block("bash", "steerlab x --n 4", 1, [("sub", "--n 7 => --n 1")]).prepared()


def test_every_readme_block_is_run_or_skipped_with_a_reason():
    blocks = parse(README.read_text())
    assert len(blocks) >= 10
    for b in blocks:
        reason = b.skip_reason()
        assert reason is None or len(reason) > 10, f"README.md:{b.line}: a skip needs its reason"
        if b.lang == "bash" and reason is None:
            cmds = [ln for ln in b.prepared().splitlines() if shlex.split(ln, comments=True)]
            assert all(ln.lstrip().startswith("steerlab ") for ln in cmds), f"README.md:{b.line}: {cmds}"


def test_readme_names_every_registered_intervention():
    from steerlab.interventions import list_interventions

    text = README.read_text()
    m = re.search(r"registered today \((\w+)\):\s+([^.]*)\.", text)
    assert m, "README.md should say which interventions are registered today"
    names = re.findall(r"`([\w-]+)`", m.group(2))
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    assert sorted(names) == sorted(list_interventions()) and m.group(1) == words[len(names)]


# --- the README, run -----------------------------------------------------------------------------------
@pytest.mark.integration
def test_readme_examples_run_and_print_what_they_quote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STEERLAB_PROGRESS", "off")
    namespace: dict = {}
    failures, ran = [], 0
    for b in parse(README.read_text()):
        if b.skip_reason():
            continue
        code, buf = b.prepared(), io.StringIO()
        try:
            if b.lang == "python":
                with contextlib.redirect_stdout(buf):
                    exec(compile(code, f"README.md:{b.line}", "exec"), namespace)
                output = buf.getvalue()
            else:
                output = run_bash(code)
        except Exception as e:  # report every failing block, not only the first
            failures.append(f"README.md:{b.line} ({b.lang}) failed: {type(e).__name__}: {e}")
            continue
        ran += 1
        if os.environ.get("STEERLAB_README_DUMP"):  # to refresh the quoted outputs by hand
            Path(os.environ["STEERLAB_README_DUMP"], f"line{b.line}.txt").write_text(output)
        if b.expected is not None and (missing := missing_lines(b.expected, output)):
            failures.append(f"README.md:{b.line}: the quoted output differs from what the block prints now; "
                            f"missing {missing}\n--- printed ---\n{output[-4000:]}")
    assert not failures, "\n\n".join(failures)
    assert ran >= 8
    # the quickstart's objects are what the README says they are
    assert namespace["acts"]["blocks.10.attn.heads"].shape == (2, 9, 64)
    assert namespace["v"].shape == (576,)
    rec = namespace["rec"]  # recorded while generating: the last prompt token, then each fed token
    assert rec["final"].shape == (1, rec.calls, 576) and 1 <= rec.calls <= 20
