"""The documentation cannot drift from the tree: README.md and docs/*.md are checked as text.

* every relative link resolves to a file of the repository and carries no anchor (headings move
  between pages; a file does not silently lose its place);
* every path written in inline code (``tools/...``, ``configs/...``, ...) exists;
* every command-line flag given to a tool exists in that tool's ``--help``: in commands
  (``python tools/X.py ... --flag``, ``python -m package.module ... --flag``, in code blocks and
  inline code) and bare inline flags (`` `--flag` ``): in the README they belong to the tool
  mentioned last before them in the same section, in docs/ to some tool the documentation names;
  every ``make`` target exists in the Makefile;
* the README stays within 250 lines, and every docs page opens with a sentence under its title.

The ``--help`` of each tool runs once, in a child process with one thread, one child per core at a
time (the tools import torch, so this is the slow part: a few seconds per tool).
"""
import concurrent.futures
import functools
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
README_MAX_LINES = 250


def doc_files():
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def rel(path):
    return os.path.relpath(path, ROOT)


DOC_IDS = [rel(p) for p in doc_files()]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------ markdown pieces

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`((?:[^`\n]|\n(?!\n))+)`")  # a span may wrap, within its paragraph
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} ", re.M)


def split_fences(text):
    """``[(is_code, piece), ...]`` in document order."""
    pieces, last = [], 0
    for match in FENCE.finditer(text):
        pieces.append((False, text[last:match.start()]))
        pieces.append((True, match.group(0)))
        last = match.end()
    pieces.append((False, text[last:]))
    return pieces


def prose(text):
    return "".join(piece for is_code, piece in split_fences(text) if not is_code)


def relative_links(text):
    """Link targets that are not URLs (``http:``, ``mailto:``, ...)."""
    return [t for t in LINK.findall(prose(text)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


# ------------------------------------------------------------------ commands and flags

# A tool is a script under tools/ or a module run with -m; the command ends at a shell operator,
# a comment, or "--" (what follows belongs to another command: cpu_info --emulate-avx2 -- pytest).
TOOL = re.compile(r"python\S*\s+(?:(tools/[\w/]+\.py)|-m\s+([\w.]+))")
TOOL_MENTION = re.compile(r"(?:python\S*\s+-m\s+([\w.]+))|(tools/[\w/]+\.py)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
MAKE = re.compile(r"(?:^|[\s`(])make\s+([a-z][\w-]*)")
COMMAND_END = re.compile(r"\s(?:\||;|&&|#|--(?=\s|$))")


def logical_lines(code):
    """The lines of a code block with backslash continuations joined."""
    return re.sub(r"\\\n", " ", code).split("\n")


def commands_in(text):
    """``(tool, [flags])`` for every tool command in ``text`` (one line or an inline span)."""
    found = []
    for match in TOOL.finditer(text):
        tail = text[match.end():]
        end = COMMAND_END.search(" " + tail)
        args = tail[: end.start() - 1] if end else tail
        # Stop at the next command on the same line.
        nxt = TOOL.search(args)
        args = args[: nxt.start()] if nxt else args
        found.append((match.group(1) or match.group(2), FLAG.findall(args)))
    return found


def make_targets_in(text):
    return MAKE.findall(text)


def flag_uses(path):
    """``(tool or None, flag, where)`` for every flag the page gives a tool, and ``("make",
    target, where)`` for every make target."""
    text = read(path)
    is_readme = os.path.abspath(path) == README
    uses = []
    current = None  # the tool mentioned last in this section
    for is_code, piece in split_fences(text):
        if is_code:
            for line in logical_lines(piece):
                for tool, flags in commands_in(line):
                    uses += [(tool, flag, line.strip()) for flag in flags]
                    current = tool
                uses += [("make", target, line.strip()) for target in make_targets_in(line)]
            continue
        # Prose: walk headings, tool mentions and inline code spans in document order.
        events = [(m.start(), "heading", m) for m in HEADING.finditer(piece)]
        events += [(m.start(), "mention", m) for m in TOOL_MENTION.finditer(piece)]
        events += [(m.start(), "code", m) for m in INLINE_CODE.finditer(piece)]
        for _, kind, match in sorted(events, key=lambda e: (e[0], e[1] != "heading")):
            if kind == "heading":
                current = None
            elif kind == "mention":
                current = match.group(1) or match.group(2)
            else:
                line_start = piece.rfind("\n", 0, match.start()) + 1
                if piece.startswith("#", line_start):
                    continue  # a heading names its subject, e.g. "Train, `--steps`, `--boxes`"
                span = match.group(1).replace("\n", " ")
                commands = commands_in(span)
                for tool, flags in commands:
                    uses += [(tool, flag, span) for flag in flags]
                uses += [("make", target, span) for target in make_targets_in(span)]
                if not commands and span.startswith("--"):
                    # README: the tool named last in the section. docs/ pages are looser prose
                    # (a flag of the tool two paragraphs up): some tool of the documentation.
                    uses.append((current if is_readme else ANY_TOOL, FLAG.match(span).group(1), span))
    return uses


ANY_TOOL = "any tool"


@functools.lru_cache(maxsize=None)
def documented_tools():
    """Every existing tool that README.md or a docs page runs or names."""
    tools = set()
    for path in doc_files():
        text = read(path)
        tools |= {m.group(1) or m.group(2) for m in TOOL_MENTION.finditer(text)}
    return sorted(t for t in tools if os.path.exists(tool_path(t)))


def tool_path(tool):
    if tool.startswith("tools/"):
        return os.path.join(ROOT, tool)
    module = os.path.join(ROOT, *tool.split("."))
    return module + ".py" if os.path.exists(module + ".py") else os.path.join(module, "__main__.py")


def help_text(tool):
    """``--help`` of a tool, run as a user runs it. A tool without argparse help (no ``usage:``;
    ``diffusiondet.utils.cpu_info`` reads its two options itself) is checked against its source."""
    texts = documented_help_texts()
    return texts[tool] if tool in texts else _run_help(tool)


@functools.lru_cache(maxsize=None)
def documented_help_texts():
    """``--help`` of every documented tool, one child process per core at a time: each child is
    single-threaded and mostly imports torch, so the cores run them side by side."""
    tools = documented_tools()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(tools, pool.map(_run_help, tools)))


@functools.lru_cache(maxsize=None)
def _run_help(tool):
    command = [sys.executable, tool] if tool.startswith("tools/") else [sys.executable, "-m", tool]
    result = subprocess.run(
        command + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    out = result.stdout + result.stderr
    if "usage:" not in out:
        out += read(tool_path(tool))
    return out


@functools.lru_cache(maxsize=None)
def make_targets():
    return set(re.findall(r"^([a-z][\w-]*):", read(os.path.join(ROOT, "Makefile")), re.M))


def check_flags(uses):
    problems = []
    for tool, flag, where in uses:
        if tool == "make":
            if flag not in make_targets():
                problems.append(f"make {flag}: no such Makefile target (in {where!r})")
        elif tool == ANY_TOOL:
            if not any(re.search(re.escape(flag) + r"(?![\w-])", help_text(t)) for t in documented_tools()):
                problems.append(f"{flag}: no documented tool has it (in {where!r})")
        elif tool is None:
            problems.append(f"{flag}: no tool named before it in its section (in {where!r})")
        elif not os.path.exists(tool_path(tool)):
            problems.append(f"{tool}: no such tool (in {where!r})")
        elif not re.search(re.escape(flag) + r"(?![\w-])", help_text(tool)):
            problems.append(f"{tool} {flag}: not in its --help (in {where!r})")
    return problems


# ------------------------------------------------------------------ paths in inline code

REPO_PATH = re.compile(r"^(?:tools|tests|configs|datasets|docs|diffusiondet|diffusioninst)/[\w./-]*[\w/]$")


def code_paths(text):
    return [span for span in INLINE_CODE.findall(prose(text)) if REPO_PATH.match(span)]


# ------------------------------------------------------------------ the checks


@pytest.mark.parametrize("path", doc_files(), ids=DOC_IDS)
def test_relative_links_resolve_to_files_without_anchors(path):
    problems = []
    for target in relative_links(read(path)):
        if "#" in target:
            problems.append(f"{target}: anchors break when a heading moves; link the page")
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        if not os.path.isfile(resolved):
            problems.append(f"{target}: no such file ({rel(resolved)})")
    assert not problems, f"{rel(path)}:\n  " + "\n  ".join(problems)


# The mutation-testing report names the files as they were when they were mutated.
HISTORICAL = {"docs/mutation_testing.md"}


@pytest.mark.parametrize("path", [p for p in doc_files() if rel(p) not in HISTORICAL],
                         ids=[i for i in DOC_IDS if i not in HISTORICAL])
def test_paths_in_inline_code_exist(path):
    missing = [p for p in code_paths(read(path)) if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"{rel(path)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("path", doc_files(), ids=DOC_IDS)
def test_flags_given_to_tools_exist(path):
    problems = check_flags(flag_uses(path))
    assert not problems, f"{rel(path)}:\n  " + "\n  ".join(problems)


def test_readme_flags_are_found():
    # Guards the parser: the README's main commands and shorthands are seen, with their tools.
    uses = set(flag_uses(README))
    pairs = {(tool, flag) for tool, flag, _ in uses}
    assert {("tools/train_net.py", "--steps"), ("tools/train_net.py", "--boxes"),
            ("tools/train_net.py", "--resume"), ("tools/run_main_job.py", "--seeds"),
            ("tools/demo.py", "--webcam"), ("make", "demo"), ("make", "test")} <= pairs


def test_readme_is_at_most_250_lines():
    lines = read(README).count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("path", doc_files()[1:], ids=DOC_IDS[1:])
def test_docs_pages_open_with_a_sentence_under_the_title(path):
    paragraphs = [p.strip() for p in read(path).split("\n\n")]
    assert paragraphs[0].startswith("# ") and "\n" not in paragraphs[0], rel(path)
    first = paragraphs[1]
    assert first[:1].isalpha() and not first.startswith(("#", "|", "```")), (
        f"{rel(path)} should open with a sentence saying what the reader gets from it"
    )


# ------------------------------------------------------------------ the checker itself


def test_the_checks_catch_a_bad_link_a_bad_flag_and_a_bad_target(tmp_path):
    page = (
        "# T\n\nA page.\n\n## Run\n\n"
        "`python tools/train_net.py --no-such-flag` then `--boxes 3` and `--nothing-here`,\n"
        "see [x](missing.md) and [y](../README.md#quick-start).\n\n"
        "```\nmake no-such-target\npython tools/demo.py --input a.png \\\n    --bogus-flag 1  # --comment-flag\n"
        "python -m diffusiondet.utils.cpu_info --emulate-avx2 -- pytest --not-ours\n```\n"
    )
    uses = flag_uses_of_text(tmp_path, page)
    flags = {(tool, flag) for tool, flag, _ in uses}
    assert ("tools/demo.py", "--comment-flag") not in flags
    assert ("diffusiondet.utils.cpu_info", "--not-ours") not in flags
    problems = "\n".join(check_flags(uses))
    assert "tools/train_net.py --no-such-flag" in problems
    assert "tools/train_net.py --nothing-here" in problems
    assert "tools/demo.py --bogus-flag" in problems
    assert "make no-such-target" in problems
    assert "--boxes" not in problems and "--emulate-avx2" not in problems
    assert relative_links(page) == ["missing.md", "../README.md#quick-start"]
    # On a docs page a bare flag only has to exist in some documented tool.
    (tmp_path / "page.md").write_text("# P\n\nA page.\n\n`--no-such-flag-anywhere` and `--webcam`.\n")
    loose = flag_uses(str(tmp_path / "page.md"))
    assert {(tool, flag) for tool, flag, _ in loose} == {(ANY_TOOL, "--no-such-flag-anywhere"), (ANY_TOOL, "--webcam")}
    assert check_flags(loose) == ["--no-such-flag-anywhere: no documented tool has it (in '--no-such-flag-anywhere')"]


def flag_uses_of_text(tmp_path, text):
    """``flag_uses`` of a made-up page, read with the README's rules."""
    global README
    saved, README = README, str(tmp_path / "README.md")
    try:
        (tmp_path / "README.md").write_text(text)
        return flag_uses(README)
    finally:
        README = saved


# ------------------------------------------------------------------ the generated config table


def test_docs_configs_md_is_what_the_generator_writes():
    from diffusiondet.tooling import config_table

    committed = read(os.path.join(ROOT, "docs", "configs.md"))
    assert committed == config_table.render(), (
        "docs/configs.md is stale: run python -m diffusiondet.tooling.config_table"
    )


def test_the_config_table_follows_the_yaml_files(tmp_path):
    from diffusiondet.tooling import config_table

    (tmp_path / "Base.yaml").write_text('MODEL:\n  META_ARCHITECTURE: "DiffusionDet"\nSOLVER:\n  MAX_ITER: 7\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        '_BASE_: "../Base.yaml"\nMODEL:\n  DiffusionDet:\n    NUM_PROPOSALS: 42\n    SAMPLE_STEP: 3\n'
    )
    assert config_table.config_files(str(tmp_path)) == ["Base.yaml", "sub/child.yaml"]
    base, child = (config_table.row(r, str(tmp_path)) for r in config_table.config_files(str(tmp_path)))
    assert base[1] == "-" and child[1] == "`Base.yaml`"
    assert child[6] == "42 / same" and child[7] == "3" and child[8].startswith("7 x ")
    assert child[9] == "`NUM_PROPOSALS 42`, `SAMPLE_STEP 3`"
    text = config_table.render(str(tmp_path))
    assert "| `sub/child.yaml` | `Base.yaml` |" in text
