"""Every command the README and docs/ show in a code block is checked: each ``lsm ...`` line
parses and its config and overrides validate (``--dry-run``: the stage's own loader, nothing
run), and every config file any shown command names exists."""

import re
import shlex
from pathlib import Path

import pytest

from lsm_dist.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSE_ONLY = (("verify",), ("train", "export"))  # no config: argument parsing is the check


def shown_commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of every shell line in the page's fenced code blocks, with
    continuation lines joined and trailing comments dropped."""
    out, fence, buf, start = [], False, "", 0
    for i, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            continue
        text = line.split(" # ")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not buf:
            start = i
        buf += text.rstrip("\\").strip() + " "
        if not text.endswith("\\"):
            if buf.strip():
                out.append((start, buf.strip()))
            buf = ""
    return out


def lsm_argv(cmd: str) -> list[str] | None:
    """The argv after ``lsm`` (leading VAR=value environment assignments skipped)."""
    words = shlex.split(cmd)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return words[1:] if words[:1] == ["lsm"] else None


CASES = [(p, n, c) for p in PAGES for n, c in shown_commands(p)]
LSM = [(p, n, c) for p, n, c in CASES if lsm_argv(c) is not None]


def test_the_docs_show_commands():
    assert len(LSM) >= 20, [c for _, _, c in LSM]
    pages = {p.name for p, _, _ in LSM}
    for name in ("README.md", "corpus.md", "training.md", "merging.md", "evaluation.md"):
        assert name in pages, f"{name} shows no lsm command in a code block"


@pytest.mark.parametrize("page,line,cmd", LSM, ids=[f"{p.name}:{n}" for p, n, _ in LSM])
def test_lsm_command_validates(page, line, cmd, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    argv = lsm_argv(cmd)
    if tuple(argv[:len(PARSE_ONLY[0])]) in PARSE_ONLY or tuple(argv[:2]) in PARSE_ONLY:
        build_parser().parse_args(argv)
        return
    if "--help-config" in argv:
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code or 0
        assert rc == 0, f"{page.name}:{line}: {cmd}"
        assert "\n" in capsys.readouterr().out
        return
    rc = main([*argv, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 0, f"{page.name}:{line}: {cmd}\n{err}"


@pytest.mark.parametrize("page,line,cmd", CASES, ids=[f"{p.name}:{n}" for p, n, _ in CASES])
def test_named_config_files_exist(page, line, cmd):
    for f in re.findall(r"(?<![\w/$])((?:configs|slurm|launchers|tools|benchmarks)/[\w./-]+\.(?:ya?ml|json|sh|py))", cmd):
        assert (REPO / f).is_file(), f"{page.name}:{line} names {f}, which does not exist"
