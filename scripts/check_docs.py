"""Run every command in README.md and docs/*.md as shown; lint the ones that cannot run here.

The convention it enforces is described in docs/docs-check.md:

- ```bash blocks are commands. Each is run with `bash -euo pipefail` in a
  scratch copy of the repository (tracked files plus new ones, `.venv/bin`
  first on PATH as after `source .venv/bin/activate`), blocks of one file in
  document order, so a later block may use an earlier block's output. A line
  that is only a pipeline command runs through `pipelines.vision_batch.main`
  in this process instead, sharing one engine (see `steps`).
  `timeout=N` in the info string overrides the default per-block timeout.
- ```bash not-run: REASON blocks are not run (Google Cloud, docker, the CI
  entry point itself). The reason is required. Their pipeline commands are
  still parsed by the pipeline's own option parser, so options stay real.
- Every bash block, run or not, uses valid placeholder names: bucket names,
  project ids, regions and zones must be names Google Cloud would accept.
- ```text holds usage synopses and output; `sh`, `shell`, `console` are
  refused (use bash or text) so no command escapes the check.
- A block of another language with `file=NAME` in its info string (```yaml
  file=invoice.yaml) is a file the reader saves: it is written to NAME in the
  scratch copy, in document order, so the commands after it use it. Every
  ```yaml block must parse, and one holding `tasks:` must be a valid task
  file (`tasks.task_file`).
- ```sql blocks are DuckDB queries over what the commands before them wrote:
  run with DuckDB in the scratch copy (BigQuery variants go in `--` comments).

    python scripts/check_docs.py                 # every file
    python scripts/check_docs.py README.md       # one file
    python scripts/check_docs.py --list          # the blocks and what would happen to them
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT_S = 600  # a hang (a network wait) fails; a slow, shared CI box does not
_FENCE = re.compile(r"^(\s*)```(.*)$")
REFUSED_LANGUAGES = {"sh", "shell", "console", "zsh", "shell-session"}
# Google Cloud naming rules, so a copied command fails on the user's resources, not on the name.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_NAME_RULES = {
    "--project": (re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$"), "a project id (6-30 lowercase letters, digits, hyphens)"),
    "--region": (re.compile(r"^[a-z]+-[a-z]+[0-9]+$"), "a region such as us-east5"),
    "--zone": (re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$"), "a zone such as us-east5-b"),
}


@dataclasses.dataclass(frozen=True)
class Block:
    path: pathlib.Path  # relative to the repository
    line: int  # 1-based line of the opening fence
    language: str
    not_run: Optional[str]  # the reason, for `not-run:` blocks
    timeout_s: int
    text: str
    file: Optional[str] = None  # `file=NAME`: written to NAME in the scratch copy


    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def runs(self) -> bool:
        return (self.language == "bash" and self.not_run is None) or self.language == "sql" or self.file is not None


def doc_files(root: pathlib.Path = REPO) -> list[pathlib.Path]:
    return [pathlib.Path("README.md")] + sorted(p.relative_to(root) for p in (root / "docs").glob("*.md"))


def blocks(path: pathlib.Path, root: pathlib.Path = REPO) -> list[Block]:
    """The fenced blocks of one Markdown file."""
    found, lines = [], (root / path).read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, info = opening.group(1), opening.group(2).strip()
        start = index + 1
        body = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else lines[index])
            index += 1
        language, _, rest = info.partition(" ")
        not_run, file = None, None
        timeout_s = DEFAULT_TIMEOUT_S
        rest = rest.strip()
        if rest.startswith("not-run"):
            not_run = rest[len("not-run"):].lstrip(":").strip()
        elif rest.startswith("timeout="):
            timeout_s = int(rest.split("=", 1)[1])
        elif rest.startswith("file=") and language != "bash":
            file = rest.split("=", 1)[1]
        elif rest:
            language = f"{language} {rest}"  # reported as an unknown info string
        found.append(Block(path, start, language, not_run, timeout_s, "\n".join(body), file))
        index += 1
    return found


def commands(text: str) -> Iterator[list[str]]:
    """Each command of a block as words (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if words:
            yield words


def lint(block: Block) -> list[str]:
    """Problems that make a block untrue whether or not it runs here."""
    problems = []
    language = block.language.split(" ")[0]
    if language in REFUSED_LANGUAGES:
        problems.append(f"```{language}: write commands as ```bash (run) or ```bash not-run: REASON, output as ```text")
    if " " in block.language:
        problems.append(
            f"unknown info string {block.language!r}: use `bash`, `bash timeout=N`, `bash not-run: REASON` or `LANGUAGE file=NAME`"
        )
    if block.file is not None and (pathlib.PurePosixPath(block.file).is_absolute() or ".." in pathlib.PurePosixPath(block.file).parts):
        problems.append(f"file={block.file}: name a file inside the repository (a relative path without '..')")
    if language == "yaml":
        problems.extend(_yaml_problems(block))
    if language != "bash":
        return problems
    if block.not_run is not None and not block.not_run:
        problems.append("not-run without a reason: say why it cannot run here (`not-run: needs Google Cloud`)")
    for bucket in re.findall(r"gs://([^/\s'\"]+)", block.text):
        if not _BUCKET.match(bucket) or "{" in bucket:
            problems.append(f"gs://{bucket}: not a valid bucket name; use a real-looking one such as my-bucket")
    for words in commands(block.text):
        for index, word in enumerate(words):
            flag, _, value = word.partition("=")
            if flag in _NAME_RULES:
                value = value or (words[index + 1] if index + 1 < len(words) else "")
                pattern, meaning = _NAME_RULES[flag]
                if not pattern.match(value):
                    problems.append(f"{flag} {value}: not a valid name; use {meaning}")
        if block.not_run is not None:
            problems.extend(_parse_pipeline_command(words))
    return problems


def _yaml_problems(block: Block) -> list[str]:
    """A YAML example must parse; one holding `tasks:` must be a task file the pipeline accepts."""
    import yaml

    from tasks.task_file import TaskFileError, parse_task_file

    try:
        document = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        return [f"not valid YAML: {' '.join(str(exc).split())}"]
    if not (isinstance(document, dict) and "tasks" in document):
        return []
    try:
        parse_task_file(block.text, block.file or "task file")
    except TaskFileError as exc:
        return [f"a task file the pipeline refuses: {' '.join(str(exc).split())}"]
    return []


def _parse_pipeline_command(words: list[str]) -> list[str]:
    """A pipeline command that is not run is still parsed: its options must exist and be valid."""
    if "pipelines.vision_batch" not in words:
        return []
    from configuration.options import UsageError, parse_args

    argv = words[words.index("pipelines.vision_batch") + 1:]
    try:
        parse_args(argv)
    except UsageError as exc:
        return [f"pipelines.vision_batch {' '.join(argv)}: {exc}"]
    return []


def scratch_copy(root: pathlib.Path, target: pathlib.Path) -> None:
    """The repository's files (tracked and new, not ignored) under `target`, with the same .venv.

    `.venv` is mirrored entry by entry, plus the stamp scripts/setup_env.sh
    looks for: the check runs in the environment it was started from (CI's
    test.sh set it up), so a script that calls setup_env.sh must not reinstall it.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = root / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    venv = pathlib.Path(sys.prefix)
    (target / ".venv").mkdir()
    for entry in venv.iterdir():
        (target / ".venv" / entry.name).symlink_to(entry)
    stamp = hashlib.sha256((root / "setup.py").read_bytes() + (root / "scripts/setup_env.sh").read_bytes()).hexdigest()[:16]
    (target / ".venv" / f".installed-{stamp}").touch(exist_ok=True)


@dataclasses.dataclass(frozen=True)
class Outcome:
    block: Block
    status: str  # "ok" | "failed" | "not-run" | "lint" | "text" | "file"
    seconds: float = 0.0
    detail: str = ""


def run_file(path: pathlib.Path, root: pathlib.Path = REPO, keep: bool = False) -> list[Outcome]:
    """Lint every block of one file and run its runnable ones, in order, in one scratch copy."""
    outcomes: list[Outcome] = []
    found = blocks(path, root)
    runnable = [b for b in found if b.runs and not lint(b)]
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="docs-check-"))
    try:
        if runnable:
            scratch_copy(root, scratch)
        env = {
            **os.environ,
            "PATH": f"{scratch / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(scratch),
        }
        for block in found:
            problems = lint(block)
            if problems:
                outcomes.append(Outcome(block, "lint", detail="; ".join(problems)))
            elif block.file is not None:
                (scratch / block.file).parent.mkdir(parents=True, exist_ok=True)
                (scratch / block.file).write_text(block.text + "\n")
                outcomes.append(Outcome(block, "file", detail=f"written to {block.file}"))
            elif block.language == "sql":
                outcomes.append(_run_sql(block, scratch))
            elif block.language != "bash":
                outcomes.append(Outcome(block, "text"))
            elif block.not_run is not None:
                outcomes.append(Outcome(block, "not-run", detail=block.not_run))
            else:
                outcomes.append(_run(block, scratch, env))
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return outcomes


_SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "<<", "(", ")"}
_PIPELINE = ("-m", "pipelines.vision_batch")


def steps(text: str) -> list[tuple[str, object]]:
    """A block as steps: ("pipeline", argv) for a pipeline command alone on its line, ("bash", script) for the rest.

    Consecutive other lines stay together in one bash script, so shell state
    (variables, `cd`) carries from one line to the next as a reader expects.
    """
    found: list[tuple[str, object]] = []
    pending: list[str] = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        argv = _pipeline_argv(line)
        if argv is None:
            pending.append(line)
            continue
        if any(l.strip() for l in pending):
            found.append(("bash", "\n".join(pending)))
        pending = []
        found.append(("pipeline", argv))
    if any(l.strip() for l in pending):
        found.append(("bash", "\n".join(pending)))
    return found


def _pipeline_argv(line: str) -> Optional[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        words = list(lexer)
    except ValueError:
        return None
    if len(words) < 3 or pathlib.Path(words[0]).name not in ("python", "python3") or tuple(words[1:3]) != _PIPELINE:
        return None
    if _SHELL_OPERATORS.intersection(words) or any("$" in w or "`" in w for w in words):
        return None
    return words[3:]


def _run(block: Block, cwd: pathlib.Path, env: dict[str, str]) -> Outcome:
    started = time.monotonic()
    output = ""
    for kind, step in steps(block.text):
        remaining = block.timeout_s - (time.monotonic() - started)
        if kind == "pipeline":
            code, text = _run_pipeline(step, cwd, env)  # type: ignore[arg-type]
        else:
            code, text = _run_bash(str(step), cwd, env, remaining)
        output += text
        if code != 0:
            return Outcome(block, "failed", time.monotonic() - started, f"exit code {code}\n{output[-3000:]}")
    return Outcome(block, "ok", time.monotonic() - started)


def _run_sql(block: Block, cwd: pathlib.Path) -> Outcome:
    """A DuckDB example, run in the scratch copy (its relative paths are the reader's working directory)."""
    import duckdb

    started = time.monotonic()
    connection = duckdb.connect()
    previous = os.getcwd()
    try:
        os.chdir(cwd)
        for statement in filter(str.strip, _sql_statements(block.text)):
            connection.execute(statement).fetchall()
    except duckdb.Error as exc:
        return Outcome(block, "failed", time.monotonic() - started, f"DuckDB: {exc}")
    finally:
        os.chdir(previous)
        connection.close()
    return Outcome(block, "ok", time.monotonic() - started)


def _sql_statements(text: str) -> list[str]:
    """Statements separated by `;` at the end of a line, `--` comment lines dropped."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return re.split(r";\s*$", code, flags=re.MULTILINE)


def _run_bash(script: str, cwd: pathlib.Path, env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    path = pathlib.Path(tempfile.mkstemp(dir=cwd, prefix=".docs-check-", suffix=".sh")[1])
    path.write_text("set -euo pipefail\n" + script + "\n")
    try:
        done = subprocess.run(["bash", str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired as expired:
        text = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        return 124, f"timed out\n{text}"
    finally:
        path.unlink()
    return done.returncode, done.stdout + done.stderr


def _run_pipeline(argv: list[str], cwd: pathlib.Path, env: dict[str, str]) -> tuple[int, str]:
    """A pipeline command, run through the command line's own `main` in this process.

    Same arguments, same code path, same exit code as the shell would see; what
    is saved is the process start (importing vLLM, starting an engine: ~20 s
    each), because every pipeline command of the check shares this process's
    engine. Process-wide state `main` sets (working directory, environment,
    logging, signal handlers) is put back afterwards.
    """
    import io

    from pipelines import vision_batch

    captured = io.StringIO()
    with vision_batch.restoring_process_state():
        os.chdir(cwd)
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                code = vision_batch.main(argv)
            except SystemExit as exit_:  # --help
                code = exit_.code if isinstance(exit_.code, int) else 1
    return code, captured.getvalue()


def report(outcomes: Sequence[Outcome]) -> str:
    lines = []
    for outcome in outcomes:
        if outcome.status in ("text", "file"):
            continue
        first = outcome.block.text.strip().splitlines()[0] if outcome.block.text.strip() else ""
        timing = f" {outcome.seconds:.0f} s" if outcome.status in ("ok", "failed") else ""
        lines.append(f"{outcome.status:8} {outcome.block.where}{timing}: {first[:90]}")
        if outcome.detail:
            lines.extend("         " + line for line in outcome.detail.splitlines())
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run the commands of README.md and docs/*.md (docs/docs-check.md).")
    parser.add_argument("files", nargs="*", type=pathlib.Path, help="Markdown files (default: README.md and docs/*.md)")
    parser.add_argument("--list", action="store_true", help="show the blocks and what would happen to them; run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (their paths are printed)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # the pipeline's option parser, for commands that are not run
    files = args.files or doc_files()
    failed = False
    for path in files:
        if args.list:
            for block in blocks(path):
                problems = lint(block)
                state = "lint" if problems else (
                    "file" if block.file else "run" if block.runs else "not-run" if block.language == "bash" else "text"
                )
                print(f"{state:8} {block.where}: {block.not_run or block.language}" + (f" -- {'; '.join(problems)}" if problems else ""))
            continue
        outcomes = run_file(path, keep=args.keep)
        print(report(outcomes))
        failed |= any(o.status in ("failed", "lint") for o in outcomes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
