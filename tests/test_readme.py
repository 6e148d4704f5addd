"""The README cannot rot: every command block in it is tested.

Each ```bash block carries a tag in the HTML comment above it:
  run / run slow   executed line by line, verbatim, in a scratch directory holding `studies/`
                   and small input files of the formats the commands convert;
  mirror TESTS     too long-running or too server-bound to run verbatim here (a cluster, a UI
                   that blocks): the named tests exist, every `hilomoe` line parses with the real
                   command-line parser, the files it reads exist, and the tests exercise the same
                   subcommands and flags (on smaller data);
  cloud            needs a cloud or Kubernetes: every file it names exists, and every `hilomoe`
                   line parses and names a valid study (tests/test_infra.py checks the files);
  ci               the fresh-machine setup: `.ci/run` performs the same steps.
Inline `hilomoe ...` commands in the prose must parse too, and every `--help` has an example.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_golden
from hilomoe.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"<!-- readme-test: (?P<tag>[^>]*?) -->\n```bash\n(?P<body>.*?)```", re.S)


def commands(body: str) -> list[str]:
    """The block's command lines, without trailing comments."""
    out = []
    for line in body.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def tagged(kind: str) -> list[tuple[str, list[str]]]:
    return [(m["tag"], commands(m["body"])) for m in BLOCK.finditer(README)
            if m["tag"].split()[0] == kind]


def hilomoe_argv(line: str) -> list[str] | None:
    """The `hilomoe` arguments of a command line (after `ray job submit ... --`), or None."""
    words = shlex.split(line)
    if "--" in words and words[0] == "ray":
        words = words[words.index("--") + 1:]
    return words[1:] if words and words[0] == "hilomoe" else None


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)  # the real parser: an unknown flag exits


def test_every_command_block_is_tagged_with_how_it_is_tested():
    assert README.count("```bash\n") == len(list(BLOCK.finditer(README)))
    kinds = {m["tag"].split()[0] for m in BLOCK.finditer(README)}
    assert kinds <= {"run", "mirror", "cloud", "ci"}, kinds


# -- run -----------------------------------------------------------------------------------------


def _inputs(d: Path) -> None:
    """Small files in the layouts the README's convert commands read (the golden cases' own)."""
    load_golden()._readme_inputs(d)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    (tmp_path / "studies").symlink_to(REPO / "studies")
    _inputs(tmp_path)
    monkeypatch.setenv("HILOMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def run_block(lines: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in lines:
        proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("lines", [c for t, c in tagged("run") if t == "run"],
                         ids=lambda c: c[0][:50])
def test_run_blocks_run_verbatim(lines, scratch):
    run_block(lines, scratch)


@pytest.mark.slow
@pytest.mark.parametrize("lines", [c for t, c in tagged("run") if t == "run slow"],
                         ids=lambda c: c[0][:50])
def test_slow_run_blocks_run_verbatim(lines, scratch):
    run_block(lines, scratch)


# -- mirror, cloud, ci -------------------------------------------------------------------------


def _test_source(node: str) -> str:
    path, name = node.split("::")
    text = (REPO / path).read_text()
    m = re.search(rf"^def {name}\(.*?(?=^def |^@|\Z)", text, re.S | re.M)
    assert m, f"{node}: no such test"
    return m.group(0)


@pytest.mark.parametrize("tag,lines", tagged("mirror"), ids=lambda v: str(v)[:60])
def test_mirrored_blocks_are_exercised_by_the_tests_they_name(tag, lines):
    sources = "\n".join(_test_source(node) for node in tag.split()[1:])
    for line in lines:
        argv = hilomoe_argv(line)
        words = argv if argv is not None else shlex.split(line)
        if argv is not None:
            parse(argv)
        for word in words:  # the subcommands, flags and files the command uses
            if word.startswith("--"):
                assert word.lstrip("-").replace("-", "_") in sources.replace("-", "_"), (line, word)
            elif "/" in word and not word.startswith("/") and word.endswith((".py", ".yaml")):
                assert (REPO / word).exists(), (line, word)  # the file the command reads
        if argv is not None:  # `hilomoe study run ...`: the tests run "study", "run"
            names = {path[-1] for path, _ in _subparsers(build_parser())}
            leading = [w for w in argv[:2] if w in names]
            assert leading and all(f'"{w}"' in sources for w in leading), line


@pytest.mark.parametrize("line", [ln for _, c in tagged("cloud") for ln in c],
                         ids=lambda v: v[:50])
def test_cloud_commands_name_files_that_exist_and_studies_that_validate(line):
    from hilomoe.study.spec import load_study

    argv = hilomoe_argv(line)
    if argv is not None:
        args = parse(argv)
        load_study(REPO / args.study)
        return
    for word in shlex.split(line):
        if word.startswith(("infra/", "studies/")):
            assert (REPO / word).exists(), word


def test_the_fresh_machine_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    for step in ("python3 -m venv .venv", ". .venv/bin/activate", "pip install -q torch==2.13.0",
                 "pip install -q -e '.[cpu,test]'", "pip install -q --no-deps torchrec==1.8.0",
                 "python -m pytest"):
        assert step in ci, step
    setup, tests = [c[0] for _, c in tagged("ci")]
    for line in (setup, tests):  # the same installs, in the same order, as CI's
        assert line.index("pip install -e '.[cpu") < line.index("--no-deps torchrec==1.8.0")
    assert setup.endswith("hilomoe study run studies/quickstart.yaml")
    # the quickstart itself runs verbatim in a `run slow` block
    assert any("hilomoe study run studies/quickstart.yaml" in ln
               for t, c in tagged("run") if t == "run slow" for ln in c)
    assert tests.endswith("python -m pytest")


def test_inline_commands_in_the_prose_parse():
    inline = re.findall(r"`(hilomoe [^`]+)`", README)
    checked = 0
    for cmd in inline:
        if re.search(r"[A-Z]{2,}|\[|\||\.\.\.", cmd):  # a synopsis with placeholders
            continue
        parse(shlex.split(cmd)[1:])
        checked += 1
    assert checked >= 5


def _subparsers(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def test_every_help_says_what_it_does_with_an_example():
    parser = build_parser()
    helps = [((), parser), *_subparsers(parser)]
    assert len(helps) > 15
    for path, p in helps:
        text = p.format_help()
        assert "example:" in text and "hilomoe" in text.split("example:")[1], path
        assert p.description, path
