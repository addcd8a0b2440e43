"""The docs check: what README.md and docs/**/*.md point at exists, and the commands they show run.

For every page:
1. every relative markdown link resolves to a file (and a `#fragment` to a heading of that page);
2. every repository path named in backticks, in prose or as a command's argument, exists. A path is
   a backticked token without spaces that is a top-level file (TOP_FILES: `Makefile`,
   `pyproject.toml`, ...) or starts with a top-level folder of the checkout (TOP_DIRS) followed by `/`
   (`trainer/train.py`, `data_prep/`); `*` globs must match something and `{a,b}` alternatives are
   expanded. Tokens with a placeholder (`<output_dir>`, `$DATA_ROOT`, `${VAR}`) are not paths, nor is
   anything under `outputs/` (written by runs, not in TOP_DIRS); no generated file needs an allowlist;
3. every command, in a code block or an inline code span that starts with a command: each distinct
   `python -m MODULE`, `torchrun ... -m MODULE`, `python path/to/tool.py` and console script of
   pyproject's [project.scripts] prints its usage and exits 0 with `--help` (run once each, in two
   processes that import torch once each); `make TARGET`
   names a Makefile target; `sbatch`/`bash` scripts exist; the `section.key=value` overrides given to
   `trainer.train` or `planner.plan` (and in `EXTRA_ARGS=`), and backticked config keys
   (`checkpoint.resume=none`, `model.image_attention: causal`, `train.seq_len`), name real config
   keys (config.Config's dataclasses) with values of the right type unless the value is a
   placeholder.
A failure is one line: `doc:line: what is wrong`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from config import Config, ConfigError, apply_overrides, from_dict

REPO = Path(__file__).resolve().parents[1]
TOP_DIRS = frozenset({"benchmarks", "config", "configs", "data_prep", "docs", "examples", "inference", "kernels",
                      "model", "parallel", "planner", "slurm", "tests", "trainer", ".ci"})
TOP_FILES = frozenset({"Makefile", "README.md", "pyproject.toml", "constraints.txt", ".gitignore"})
SECTIONS = frozenset(f.name for f in dataclasses.fields(Config))
COMMAND_LANGS = frozenset({"", "bash", "sh", "shell", "console"})
HELP_TIMEOUT_S = 180

_PATH_TOKEN = re.compile(r"[A-Za-z0-9_.\-/*{},]+")
_PLACEHOLDER = re.compile(r"[<>$]")
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_OVERRIDE = re.compile(r"([a-z_]+(?:\.[a-z_][a-z0-9_]*)+)=(.*)", re.S)
_YAML_KEY = re.compile(r"([a-z_]+(?:\.[a-z_][a-z0-9_]*)+): (\S+)")
_BARE_KEY = re.compile(r"[a-z_]+(?:\.[a-z_][a-z0-9_]*)+")
_ENV_ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_PLACEHOLDER_VALUE = re.compile(r"[A-Z][A-Z0-9_]*|.*(\.\.\.|…|<|\$).*", re.S)
_SEPARATORS = frozenset({"&&", "||", ";", "|", "&"})
_FILE_SUFFIXES = frozenset({"py", "md", "json", "jsonl", "yaml", "yml", "sh", "pt", "txt", "toml", "png", "out"})


def docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# --- reading a page -------------------------------------------------------------------------------

@dataclass
class Page:
    path: Path
    prose: list[tuple[int, str]] = field(default_factory=list)  # paragraphs: (first line, text)
    code: list[tuple[int, str, str]] = field(default_factory=list)  # fenced lines: (line, lang, text)
    headings: list[str] = field(default_factory=list)


def read_page(path: Path) -> Page:
    page = Page(path)
    fence, lang, para, para_start = None, "", [], 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if fence is None and (stripped.startswith("```") or stripped.startswith("~~~")):
            if para:
                page.prose.append((para_start, "\n".join(para)))
                para = []
            fence, lang = stripped[:3], stripped[3:].strip().lower()
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            else:
                page.code.append((n, lang, line))
            continue
        if not stripped:
            if para:
                page.prose.append((para_start, "\n".join(para)))
                para = []
            continue
        if not para:
            para_start = n
        para.append(line)
        if re.match(r"#{1,6} ", stripped):
            page.headings.append(stripped.lstrip("#").strip())
    if para:
        page.prose.append((para_start, "\n".join(para)))
    return page


def anchors(page: Page) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to dashes, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in page.headings:
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def code_spans(page: Page):
    """(line, text) of every inline code span of the prose."""
    for start, text in page.prose:
        for m in _CODE_SPAN.finditer(text):
            yield start + text.count("\n", 0, m.start()), " ".join(m.group(1).split())


def shell_lines(page: Page):
    """(line, text) of the shell lines of the code blocks, continuation lines joined."""
    pending, pending_line = "", 0
    for n, lang, text in page.code:
        if lang not in COMMAND_LANGS:
            continue
        if not pending:
            pending_line = n
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        yield pending_line, pending + text
        pending = ""
    if pending:
        yield pending_line, pending


# --- the rules --------------------------------------------------------------------------------------

def is_repo_path(token: str) -> bool:
    if not _PATH_TOKEN.fullmatch(token) or _PLACEHOLDER.search(token):
        return False
    head, sep, _ = token.partition("/")
    return token in TOP_FILES or (bool(sep) and head in TOP_DIRS)


def expand_braces(token: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return [token]
    return [x for alt in m.group(1).split(",") for x in expand_braces(token[:m.start()] + alt + token[m.end():])]


def path_error(token: str) -> str | None:
    for candidate in expand_braces(token):
        target = candidate.rstrip("/")
        found = list(REPO.glob(target)) if "*" in target else [REPO / target] if (REPO / target).exists() else []
        if not found:
            return f"`{token}` names {candidate}, which does not exist"
        if candidate.endswith("/") and not all(p.is_dir() for p in found):
            return f"`{token}` is not a folder"
    return None


def _unwrap(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def config_key_error(key: str) -> str | None:
    """None if `key` (dotted) is a config key or a section of one; else what is wrong."""
    cls = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None  # inside a list or mapping value: untyped below here
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return f"'{'.'.join(parts[:i + 1])}' is not a config key"
        cls = _unwrap(hints[part])
    return None


def override_error(key: str, value: str) -> str | None:
    err = config_key_error(key)
    if err or _PLACEHOLDER_VALUE.fullmatch(value.strip()):
        return err
    try:
        from_dict(Config, apply_overrides({}, [f"{key}={value}"]))
    except ConfigError as e:
        return f"{key}={value}: {e}"
    return None


def is_module_path(dotted: str) -> bool:
    """`parallel.engine`, `model.vq`, `model.Objective`: a module (or a name in one) of the checkout."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:i])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


@functools.lru_cache(maxsize=None)
def make_targets() -> frozenset[str]:
    names = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"([A-Za-z0-9_.\-]+)\s*:(?!=)", line)
        if m and not m.group(1).startswith("."):
            names.add(m.group(1))
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def console_scripts() -> frozenset[str]:
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
    return frozenset(re.findall(r"^([A-Za-z0-9_.\-]+)\s*=", section.group(1), re.M)) if section else frozenset()


def split_commands(text: str) -> list[list[str]]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a shell line
        return []
    out, cur = [], []
    for tok in tokens:
        if tok in _SEPARATORS:
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    out.append(cur)
    return [c for c in out if c]


def is_python(word: str) -> bool:
    return word in ("python", "python3") or word.endswith("/python") or word.endswith("/python3")


# --- collecting what the pages say ------------------------------------------------------------------

@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    helps: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, target) -> where first shown


def check_command(words: list[str], where: str, found: Findings) -> None:
    env = []
    while words and _ENV_ASSIGN.match(words[0]):
        env.append(words.pop(0))
    if not words:
        return
    first, args = words[0], words[1:]
    for tok in words:
        if is_repo_path(tok) and (err := path_error(tok)):
            found.errors.append(f"{where}: {err}")
    module = None
    if is_python(first) or first == "torchrun":
        if "-m" in args:
            i = args.index("-m")
            module = args[i + 1] if i + 1 < len(args) else ""
            rest = args[i + 2:]
            if not _MODULE.fullmatch(module):
                if not _PLACEHOLDER.search(module):
                    found.errors.append(f"{where}: `{module}` is not a module name")
                return
            found.helps.setdefault(("module", module), where)
        elif is_python(first) and args and args[0].endswith(".py"):
            if not _PLACEHOLDER.search(args[0]):
                if (REPO / args[0]).is_file():
                    found.helps.setdefault(("file", args[0]), where)
                elif not is_repo_path(args[0]):  # a repository path was reported above
                    found.errors.append(f"{where}: script {args[0]} does not exist")
            return
        else:
            return
        if module in ("trainer.train", "planner.plan"):
            for tok in rest:
                if (m := _OVERRIDE.fullmatch(tok)) and m.group(1).split(".")[0] in SECTIONS:
                    if err := override_error(m.group(1), m.group(2)):
                        found.errors.append(f"{where}: override {err}")
    elif first == "make":
        for target in args:
            if not target.startswith("-") and "=" not in target and target not in make_targets():
                found.errors.append(f"{where}: `make {target}`: no such target in the Makefile")
    elif first in ("sbatch", "bash", "sh", "srun"):
        scripts = [a for a in args if a.endswith(".sh")]
        for script in scripts:
            if not _PLACEHOLDER.search(script) and not is_repo_path(script) and not (REPO / script).is_file():
                found.errors.append(f"{where}: script {script} does not exist")
    elif first in console_scripts():
        found.helps.setdefault(("script", str(Path(sys.executable).parent / first)), where)
    elif re.fullmatch(r"transfusion-[a-z\-]+", first):
        found.errors.append(f"{where}: `{first}` is not a console script of pyproject.toml")
    for assignment in env:  # EXTRA_ARGS="optim.lr=2e-4 ..." given to slurm/pretrain_7b.sh
        name, _, value = assignment.partition("=")
        if name == "EXTRA_ARGS":
            for tok in value.split():
                if (m := _OVERRIDE.fullmatch(tok)) and (err := override_error(m.group(1), m.group(2))):
                    found.errors.append(f"{where}: override {err}")


def starts_command(text: str) -> bool:
    words = text.split()
    while words and _ENV_ASSIGN.match(words[0]):
        words.pop(0)
    return bool(words) and (is_python(words[0]) or words[0] in ("torchrun", "make", "sbatch", "bash")
                            or words[0] in console_scripts())


def check_page(path: Path, found: Findings) -> None:
    page = read_page(path)
    name = rel(path)
    for start, text in page.prose:
        for m in _LINK.finditer(_CODE_SPAN.sub(lambda s: " " * len(s.group(0)), text)):
            where = f"{name}:{start + text.count(chr(10), 0, m.start())}"
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.\-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, frag = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                found.errors.append(f"{where}: link ({target}) points at {rel(dest)}, which does not exist")
            elif frag and dest.suffix == ".md" and frag not in anchors(read_page(dest)):
                found.errors.append(f"{where}: link ({target}): {rel(dest)} has no heading #{frag}")
    for line, span in code_spans(page):
        where = f"{name}:{line}"
        if is_repo_path(span):
            if err := path_error(span):
                found.errors.append(f"{where}: {err}")
        elif starts_command(span):
            for words in split_commands(span):
                check_command(words, where, found)
        elif m := (_OVERRIDE.fullmatch(span) or _YAML_KEY.fullmatch(span)):
            if m.group(1).split(".")[0] in SECTIONS and " " not in m.group(2) and (
                    err := override_error(m.group(1), m.group(2))):
                found.errors.append(f"{where}: {err}")
        elif (_BARE_KEY.fullmatch(span) and span.split(".")[0] in SECTIONS and span.rsplit(".", 1)[1] not in _FILE_SUFFIXES
              and not is_module_path(span)):
            if err := config_key_error(span):
                found.errors.append(f"{where}: {err}")
    for line, text in shell_lines(page):
        for words in split_commands(text):
            check_command(words, f"{name}:{line}", found)


def collect(paths: list[Path]) -> Findings:
    found = Findings()
    for path in paths:
        check_page(path, found)
    return found


# Runs `--help` of each (kind, target) given as JSON in one process, so torch and the project are
# imported once per process rather than once per command: a module as `python -m` runs it, a file as
# `python FILE` runs it (its folder first on sys.path), an installed console script's wrapper file.
# Prints one JSON list of [exit code, output tail].
_HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
results = []
for kind, target in json.loads(sys.argv[1]):
    sys.argv = [target, "--help"]
    buf, code = io.StringIO(), 0
    saved_path = list(sys.path)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                if kind == "file":
                    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        code = 1
        buf.write(f"\n{type(e).__name__}: {e}")
    finally:
        sys.path[:] = saved_path
    if code == 0 and "usage" not in buf.getvalue().lower():
        code = 1
        buf.write("\n--help printed no usage text")
    results.append([code, buf.getvalue()[-400:]])
sys.__stdout__.write("\n@@HELP@@" + json.dumps(results) + "\n")
"""


def run_helps(helps: dict[tuple[str, str], str], workers: int = 2) -> list[str]:
    """`--help` of every (kind, target) in `helps` (kind: module, file or script) must exit 0 with a usage
    text; the commands are shared out over `workers` processes. Returns one line per failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    jobs = sorted(helps)
    errors = [f"{helps[j]}: `{Path(j[1]).name} --help`: {j[1]} is not installed"
              for j in jobs if j[0] == "script" and not Path(j[1]).is_file()]
    jobs = [j for j in jobs if not (j[0] == "script" and not Path(j[1]).is_file())]
    chunks = [jobs[i::workers] for i in range(workers) if jobs[i::workers]]

    def shown(job: tuple[str, str]) -> str:
        return {"module": f"python -m {job[1]}", "file": f"python {job[1]}"}.get(job[0], Path(job[1]).name) + " --help"

    def run(chunk: list[tuple[str, str]]) -> list[str]:
        try:
            p = subprocess.run([sys.executable, "-c", _HELP_RUNNER, json.dumps(chunk)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=HELP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return [f"{helps[j]}: `{shown(j)}`: the --help runs did not finish in {HELP_TIMEOUT_S} s" for j in chunk]
        marker = p.stdout.rfind("@@HELP@@")
        if marker < 0:
            tail = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
            return [f"{helps[j]}: `{shown(j)}`: the --help runner died ({tail})" for j in chunk]
        out = []
        for job, (code, text) in zip(chunk, json.loads(p.stdout[marker + len("@@HELP@@"):])):
            if code != 0:
                last = (text.strip() or "no output").splitlines()[-1]
                out.append(f"{helps[job]}: `{shown(job)}` exited {code}: {last}")
        return out

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk_errors in pool.map(run, chunks):
            errors += chunk_errors
    return errors


# --- the tests ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def repo_findings() -> Findings:
    return collect(docs())


def test_every_page_is_linked_from_the_readme():
    readme = read_page(REPO / "README.md")
    linked = {(REPO / m.group(1).partition("#")[0]).resolve() for _, text in readme.prose
              for m in _LINK.finditer(text)}
    missing = [rel(p) for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked]
    assert not missing, "README.md links none of: " + ", ".join(missing)


def test_links_paths_and_config_keys_resolve():
    errors = repo_findings().errors
    assert not errors, "\n" + "\n".join(errors)


def test_every_command_shown_runs_with_help():
    helps = repo_findings().helps
    t0 = time.perf_counter()
    errors = run_helps(helps)
    print(f"{len(helps)} --help runs in {time.perf_counter() - t0:.1f} s")
    assert not errors, "\n" + "\n".join(errors)


def test_the_checker_catches_what_is_broken(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n")
    bad = tmp_path / "bad.md"
    bad.write_text(
        "# Title\n\n"
        "See [the page](other.md), [a missing page](missing.md) and [a bad anchor](other.md#nowhere).\n"
        "The trainer is `trainer/train.py`; `trainer/no_such_file.py` and `docs/nothing/` are not;\n"
        "`outputs/run/x.pt` and `<output_dir>/metrics.jsonl` are not checked.\n"
        "Set `checkpoint.resume=none` or `checkpoint.resum=none`; `train.seq_len` but `train.seq_lne`;\n"
        "`parallel.tp=N` is a placeholder, `parallel.tp=two` is not an integer.\n\n"
        "```bash\n"
        "python -m trainer.train --config configs/tiny.yaml optim.lr=1e-3 optim.lrr=1e-3\n"
        "python -m no_such_module_for_the_docs_check --out x\n"
        "torchrun --nproc-per-node 2 -m trainer.train --config configs/nope.yaml\n"
        "make demo && make no-such-target\n"
        "DATA_ROOT=/x sbatch slurm/no_such_script.sh\n"
        "```\n"
    )
    found = collect([bad])
    errors = found.errors + run_helps({k: v for k, v in found.helps.items() if "no_such_module" in " ".join(k)})
    text = "\n".join(errors)
    expect = ["bad.md:3: link (missing.md)", "bad.md:3: link (other.md#nowhere)", "bad.md:4: `trainer/no_such_file.py`",
              "bad.md:4: `docs/nothing/`", "bad.md:6: 'checkpoint.resum' is not a config key",
              "bad.md:6: 'train.seq_lne' is not a config key", "bad.md:7: parallel.tp=two",
              "bad.md:10: override 'optim.lrr' is not a config key", "bad.md:11: `python -m no_such_module_for_the_docs_check",
              "bad.md:12: `configs/nope.yaml`", "bad.md:13: `make no-such-target`",
              "bad.md:14: `slurm/no_such_script.sh`"]
    for e in expect:
        assert e in text, f"the checker missed {e!r}; it found:\n{text}"
    assert len(errors) == len(expect), text
    assert ("module", "trainer.train") in found.helps
