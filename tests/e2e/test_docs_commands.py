"""Every command in README.md and docs/*.md stays true.

Each shell command of a fenced ``bash`` / ``sh`` / ``console`` block is taken apart (continuation lines joined,
comments dropped, ``&&`` chains split) and, when it runs one of the project's entry points (``python
train_qat.py | correct_qc.py | val.py | export.py | mixed_precision.py``, ``python benchmarks/<x>.py``, ``yolo-qat
<mode>``), checked against that entry point's real argument parser: the script exists, every flag exists and every
value parses (a ``--config`` yaml of the repo included), and the repo files it names exist. Nothing is trained:
the parser runs inside the script's own ``main`` and stops it right after parsing. So a renamed flag, script or
config file fails here. Commands that need downloads, a GPU or files an earlier command makes (COCO training,
TensorRT's ``trtexec``, ``runs/...`` outputs) are checked this way only; other tools' commands (``wget``,
``trtexec``) are listed as not checked.

Run for real: every ``--help`` command of the docs, and each Python block marked ``<!-- docs-test: run -->`` (the
README's pipeline from Python, at its tiny size), as a script in a temporary directory. The README's demo
(``python train_qat.py`` with no arguments, a few minutes) is parse-checked here: it is the command of the README's
first set-up line, and ``tests/e2e/test_demo.py`` checks that no arguments make it the demo.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console", "shell"}
RUN_MARK = "<!-- docs-test: run -->"
# yolo-qat's modes and the scripts whose flags they take.
MODES = {"train": "train_qat.py", "qc": "correct_qc.py", "val": "val.py", "export": "export.py",
         "allocate": "mixed_precision.py"}
TOP = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} - {"runs", "datasets"}
FILE_EXT = (".yaml", ".yml", ".py", ".sh", ".txt", ".md", ".json")


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    text: str
    run: bool

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


@dataclass
class Command:
    block: Block
    argv: list[str]

    def __str__(self) -> str:
        return f"{self.block.where()}: {shlex.join(self.argv)}"


def blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of a markdown file (``` or ~~~ fences; the language is the info string's first word)."""
    out, lines = [], doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(```|~~~)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        run = any(RUN_MARK in lines[j] for j in range(max(0, i - 2), i))
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        out.append(Block(doc, start + 1, lang, "\n".join(body), run))
        i += 1
    return out


def commands(block: Block) -> list[Command]:
    """The shell commands of a block: continuations joined, ``$ `` prompts and comments dropped, ``&&`` / ``;``
    chains split, variables the block assigns (``C="--weights ..."``) expanded where a word uses them (``$C``)."""
    text = re.sub(r"\\\n", " ", block.text)
    out, pending, variables = [], "", {}
    for line in text.splitlines():
        line = pending + re.sub(r"^\s*\$\s+", "", line)
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:  # a quote that continues on the next line (python -c "...")
            pending = line + "\n"
            continue
        pending, argv = "", []
        for tok in tokens + [";"]:
            if tok in (";", "&&", "||", "|", "&"):
                if len(argv) == 1 and ASSIGNMENT.fullmatch(argv[0]):  # NAME=value alone: a variable, not a command
                    name, value = argv[0].split("=", 1)
                    variables[name] = value
                elif argv:
                    out.append(Command(block, argv))
                argv = []
            else:
                argv += expand(tok, variables)
    return out


ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*", re.S)


def expand(word: str, variables: dict) -> list[str]:
    """An unquoted ``$NAME`` / ``${NAME}`` word splits into the words of its value, as the shell does; a known variable
    inside a longer word is substituted in place."""
    whole = re.fullmatch(r"\$(?:\{(\w+)\}|(\w+))", word)
    if whole and (whole.group(1) or whole.group(2)) in variables:
        return shlex.split(variables[whole.group(1) or whole.group(2)])
    return [re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), word)]


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


def all_commands() -> list[Command]:
    return [c for b in all_blocks() if b.lang in SHELL for c in commands(b)]


PREFIXES = {"do", "then", "time", "exec"}  # words before the command itself (a loop body, a timer)


def entry_point(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script path relative to the repo, its arguments) for a command of the project's own entry points;
    environment assignments (``OMP_NUM_THREADS=1``), ``nice -n N`` and loop words before it are skipped."""
    while argv and (argv[0] in PREFIXES or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0])):
        argv = argv[1:]
    if argv[:1] == ["nice"]:
        argv = argv[3:] if argv[1:2] == ["-n"] else argv[1:]
    if not argv:
        return None
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        return argv[1], argv[2:]
    if argv[0] == "yolo-qat":
        return "yolo-qat", argv[1:]
    return None


def repo_paths(args: list[str]) -> list[str]:
    """The arguments that name a file or folder of the repo (configs/..., data/..., benchmarks/..., a root file)."""
    out = []
    for a in args:
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        if value.startswith("-") or "{" in value or "*" in value or "<" in value:
            continue
        head = value.split("/", 1)[0]
        if ("/" in value and head in TOP) or ("/" not in value and value.endswith(FILE_EXT)
                                              and (ROOT / value).exists()):
            out.append(value)
        elif "/" not in value and value.startswith("requirements") and value.endswith(".txt"):
            out.append(value)
    return out


ELIDED = "..."  # a doc's "more of the same" inside a command: only its flags' names are checked then


class Parsed(BaseException):
    """Raised by the patched parser right after parsing (or, for an elided command, before: carrying the parser):
    the run stops there (BaseException: no handler of the scripts catches it)."""


@contextlib.contextmanager
def parse_only(tmp_config: Path, elided: bool = False):
    """Within: ``ArgumentParser.parse_args`` parses, then raises ``Parsed``; devices are not resolved (a doc's
    ``--device 0`` is a GPU the suite may not have); a ``--config`` naming a file an earlier command writes
    (``runs/...``) reads an empty yaml instead."""
    from yolo_qat.engine import cli_common, settings

    real_parse, real_device_arg, real_read = argparse.ArgumentParser.parse_args, cli_common.device_arg, settings.read_config

    def parse_args(self, args=None, namespace=None):
        raise Parsed(self if elided else real_parse(self, args, namespace))

    def read_config(path, p):
        made_later = str(path).startswith("runs/")
        return real_read(tmp_config if made_later else path, p)

    argparse.ArgumentParser.parse_args = parse_args
    cli_common.device_arg = lambda prog: str  # where the shared flags read it
    settings.read_config = read_config
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real_parse
        cli_common.device_arg, settings.read_config = real_device_arg, real_read
        sys.path[:], sys.argv[:] = saved_path, saved_argv


def check_parses(script: str, args: list[str], tmp_config: Path) -> str | None:
    """None when ``script args`` parses with the script's own parser; else what went wrong."""
    if script == "yolo-qat":
        if not args or args[0] not in MODES and not args[0].startswith("-"):
            return f"yolo-qat has no mode {args[:1]} (modes: {', '.join(MODES)})"
        try:
            from yolo_qat.cli import entrypoint
        except ImportError as e:
            return f"yolo-qat is documented but its entry point does not import: {e}"
        target, argv0 = entrypoint, "yolo-qat"
    else:
        path = ROOT / script
        if not path.is_file():
            return f"{script} does not exist"
        target, argv0 = None, str(path)
    err, elided = io.StringIO(), ELIDED in args
    with parse_only(tmp_config, elided), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        sys.argv[:] = [argv0, *args]
        try:
            if target is None:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            else:
                code = target()
                if code:
                    return f"exit status {code}: {err.getvalue().strip()[-600:]}"
        except Parsed as parsed:
            if elided:
                known = parsed.args[0]._option_string_actions
                unknown = [a.split("=")[0] for a in args if a.startswith("-") and not re.fullmatch(r"-[\d.e-]+", a)
                           and a.split("=")[0] not in known]
                return f"no such flag: {', '.join(unknown)}" if unknown else None
            return None
        except SystemExit as e:
            if e.code in (0, None):
                return None  # --help
            return f"exit status {e.code}: {err.getvalue().strip()[-600:]}"
        except Exception as e:  # noqa: BLE001 - reported with the command
            return f"{type(e).__name__}: {e}"
    return f"{script} ran to its end without parsing its arguments"


@pytest.fixture(scope="module")
def tmp_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("docs") / "made-by-an-earlier-command.yaml"
    p.write_text("{}\n")
    return p


def test_the_docs_have_commands():
    cmds = all_commands()
    entry = [c for c in cmds if entry_point(c.argv)]
    assert len(entry) >= 40, f"only {len(entry)} entry-point commands found: is the extraction broken?"
    readme = [c for c in entry if c.block.doc.name == "README.md"]
    assert any(c.argv[:2] == ["python", "train_qat.py"] and len(c.argv) == 2 for c in readme), "the demo command"
    assert any(b.run and b.lang == "python" for b in blocks(ROOT / "README.md")), "README's Python block to run"


def test_every_entry_point_command_parses(tmp_config):
    failures, checked, other = [], 0, set()
    for c in all_commands():
        ep = entry_point(c.argv)
        if ep is None:
            if c.argv[0] == "bash" and len(c.argv) > 1 and not (ROOT / c.argv[1]).is_file():
                failures.append(f"{c}\n    {c.argv[1]} does not exist")
            other.add(c.argv[0] if c.argv[0] not in ("python", "python3") else " ".join(c.argv[:2]))
            for p in repo_paths(c.argv[1:]):
                if not (ROOT / p).exists():
                    failures.append(f"{c}\n    names {p}, which is not in the repo")
            continue
        script, args = ep
        for p in repo_paths(args):
            if not (ROOT / p).exists():
                failures.append(f"{c}\n    names {p}, which is not in the repo")
        problem = check_parses(script, args, tmp_config)
        checked += 1
        if problem:
            failures.append(f"{c}\n    {problem}")
    print(f"{checked} entry-point commands parse-checked; other commands, not checked: {sorted(other)}")
    assert not failures, "commands in the docs that do not hold:\n" + "\n".join(failures)


@pytest.mark.parametrize("argv, words", [
    (["python", "train_qat.py", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["python", "train_qat.py", "--epochs", "ten"], "invalid int value"),
    (["python", "correct_qc.py", "--weights", "x.pt", "--stepz", "3"], "unrecognized arguments"),
    (["python", "val.py", "--weights", "a.pt", "--conf", "high"], "invalid float value"),
    (["python", "train_qat.py", "--config", "configs/no_such_recipe.yaml"], "does not exist"),
    (["python", "train_qt.py", "--epochs", "1"], "train_qt.py does not exist"),
    (["python", "benchmarks/reproduce.py", "--bitz", "4"], "unrecognized arguments"),
    (["yolo-qat", "trian"], "no mode"),
    (["yolo-qat", "qc", "--weights", "x.pt", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["python", "export.py", "--weights", "x.pt", "...", "--opset-x", "21"], "no such flag: --opset-x"),
])
def test_a_wrong_command_is_caught(tmp_config, argv, words):
    """The check above is not vacuous: a misspelt flag, a bad value, a missing config, a renamed script fail it."""
    script, args = entry_point(argv)
    problem = check_parses(script, args, tmp_config)
    assert problem and words in problem, problem


def test_block_variables_are_expanded_and_checked(tmp_config):
    """A flag hidden in a variable the block assigns is checked like one written out."""
    block = Block(ROOT / "README.md", 1, "bash", 'C="--epochs 3 --no-such-flag \\\n --imgsz 64"\n'
                                                   'python train_qat.py $C --w-bits 4 && echo ${C}/x\n', False)
    cmds = commands(block)
    assert [c.argv for c in cmds] == [["python", "train_qat.py", "--epochs", "3", "--no-such-flag", "--imgsz", "64",
                                       "--w-bits", "4"], ["echo", "--epochs 3 --no-such-flag   --imgsz 64/x"]]
    problem = check_parses(*entry_point(cmds[0].argv), tmp_config)
    assert problem and "unrecognized arguments: --no-such-flag" in problem, problem


def test_a_missing_repo_file_is_named():
    assert repo_paths(["--config", "configs/gone.yaml", "--weights", "fp.pt", "-r", "requirements.txt"]) == [
        "configs/gone.yaml", "requirements.txt"]


def test_help_commands_run():
    """Every ``--help`` of the docs, run for real (a subprocess each, from the clone)."""
    helps = [c for c in all_commands() if entry_point(c.argv) and ("--help" in c.argv or "-h" in c.argv)]
    assert helps, "the docs show no --help command"
    for c in helps:
        argv = [sys.executable, *c.argv[1:]] if c.argv[0].startswith("python") else \
            [sys.executable, "-c", "import sys; from yolo_qat.cli import entrypoint; sys.exit(entrypoint())",
             *c.argv[1:]]
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "YOLO_OFFLINE": "1"})
        assert r.returncode == 0 and "usage:" in r.stdout, f"{c}\n{r.stdout[-500:]}{r.stderr[-1500:]}"


def test_marked_python_blocks_run(tmp_path):
    """The Python blocks marked to run (README's pipeline), each as a script in an empty directory."""
    marked = [b for b in all_blocks() if b.run and b.lang == "python"]
    assert marked
    for i, b in enumerate(marked):
        work = tmp_path / f"block{i}"
        work.mkdir()
        (work / "block.py").write_text(b.text + "\n")
        env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
        r = subprocess.run([sys.executable, "block.py"], cwd=work, capture_output=True, text=True,
                           env=env)
        assert r.returncode == 0, f"{b.where()} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_links_between_the_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file inside the repo, and its #anchor a heading there."""
    bad = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # a web address
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists() or ROOT not in file.parents and file != ROOT:
                bad.append(f"{doc.relative_to(ROOT)}: {target} does not exist in the repo")
            elif anchor and file.suffix == ".md":
                heads = {slug(h) for h in re.findall(r"^#+\s+(.*)$", file.read_text(), flags=re.M)}
                if anchor not in heads:
                    bad.append(f"{doc.relative_to(ROOT)}: #{anchor} is no heading of {file.name}")
    assert not bad, "\n".join(bad)
