#!/usr/bin/env python3
"""Lint patches/<Name>/000N-*.patch: the form refresh_patches.sh writes, one subject prefix per series, a
what/why message, and each series within its size budget (patches/README.md, "Rules the lint enforces").

    python scripts/lint_patches.py [--root DIR] [NAME ...]

Checks only the files: no third_party/ checkout is needed (scripts/refresh_patches.sh NAME --dry-run checks
that the files are exactly what the commits give, and scripts/apply_patches.sh --check that they apply).
Prints one line per problem, ``patches/<Name>/<file>: error: <what> (<fix>)``.

Exit codes: 0 no problem, 1 problems found, 2 usage (unknown NAME, no patches/ folder, no budget table).
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

AUTHOR = "debias maintainers <debias@localhost>"
ZERO_FROM = "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001"
SERIES_FILE = re.compile(r"^(\d{4})-(.+)\.patch$")
FULL_INDEX = re.compile(r"^index [0-9a-f]{40}\.\.[0-9a-f]{40}( [0-7]{6})?$")
DATE = re.compile(r"^Date: \w{3}, \d{1,2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}$")
RENAME = re.compile(r"^(similarity index|dissimilarity index|rename from|rename to|copy from|copy to) ")
OUTSIDE_POINTER = re.compile(r"UPSTREAM\.md|\.\./shared|\bissues? #?\d", re.IGNORECASE)
PRIVATE_API = re.compile(r"debias_core\.(\w+\.)*_\w+|from debias_core\.\w+ import")
BUDGET_ROW = re.compile(r"^\|\s*`?([\w.-]+)`?\s*\|\s*`([\w-]+):`\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|")
MIME_HEADERS = {"MIME-Version: 1.0", "Content-Type: text/plain; charset=UTF-8",  # a message with non-ASCII text
                "Content-Transfer-Encoding: 8bit"}
SUBJECT_MAX = 72
BODY_MIN_WORDS = 20
SLUG_MAX = 52  # git format-patch's file-name limit (64) less "0001-" and ".patch" and one


@dataclass(frozen=True)
class Budget:
    prefix: str          # every subject starts "<prefix>: "
    changed_lines: int   # added + removed lines in the series' diffs
    file_lines: int      # lines of the series' patch files, messages included


@dataclass
class Patch:
    path: Path
    lines: list
    subject: str
    body: list           # message lines between the subject and "---"
    diff: list           # from the first "diff --git" on


def read_budgets(readme: Path) -> dict:
    """{series: Budget} from the budget table in patches/README.md (rows ``| Name | `prefix:` | n | m |``)."""
    budgets = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        m = BUDGET_ROW.match(line)
        if m:
            budgets[m[1]] = Budget(m[2], int(m[3]), int(m[4]))
    return budgets


def slug(subject: str) -> str:
    """The file-name part git format-patch derives from a subject: runs of characters other than letters,
    digits, '.' and '_' become one '-', repeated dots one '.', trailing '.'/'-' go, then the cut to 52."""
    out, gap = [], False
    for ch in subject:
        if ch.isascii() and (ch.isalnum() or ch in "._"):
            if gap and out:
                out.append("-")
            gap = False
            if not (ch == "." and out and out[-1] == "."):
                out.append(ch)
        else:
            gap = True
    return "".join(out).rstrip(".-")[:SLUG_MAX]


def parse(path: Path) -> tuple[Patch | None, list]:
    """(patch, problems): the problems are the form errors that stop further checks."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    problems = []
    if not text.endswith("\n"):
        problems.append("the file does not end with a newline")
    header_end = lines.index("") if "" in lines else len(lines)
    header = lines[:header_end]
    if not header or header[0] != ZERO_FROM:
        return None, [f"first line is {header[0] if header else ''!r}, not the all-zeros From line of "
                      f"`format-patch --zero-commit`"]
    if f"From: {AUTHOR}" not in header:
        problems.append(f"author is not `{AUTHOR}`")
    if not any(DATE.match(h) for h in header):
        problems.append("no RFC 2822 `Date:` header")
    extra = [h.split(":")[0] for h in header[1:] if not h.startswith((" ", "From:", "Date:", "Subject:"))
             and h not in MIME_HEADERS]
    if extra:
        problems.append(f"unexpected header(s) {', '.join(extra)} (threading or cover-letter output)")
    start = next((i for i, h in enumerate(header) if h.startswith("Subject: ")), None)
    if start is None:
        return None, problems + ["no `Subject:` header"]
    subject_lines = [header[start][len("Subject: "):]]
    subject_lines += [h[1:] for h in header[start + 1:] if h.startswith(" ")]
    subject = " ".join(subject_lines)
    if not subject.startswith("[PATCH] "):
        return None, problems + [f"subject {subject.split(']')[0]}] is numbered; refresh writes `[PATCH]` "
                                 f"(--no-numbered)"]
    subject = subject[len("[PATCH] "):]
    try:
        sep = lines.index("---", header_end)
        first_diff = next(i for i, line in enumerate(lines) if line.startswith("diff --git "))
    except (ValueError, StopIteration):
        return None, problems + ["no `---` separator or no `diff --git` section"]
    return Patch(path, lines, subject, lines[header_end + 1:sep], lines[first_diff:]), problems


def check_form(patch: Patch) -> list:
    problems = []
    tail = patch.lines[-4:]
    if "-- " in tail:
        problems.append("ends with a signature (`-- ` and the git version): refresh writes --no-signature")
    for line in patch.diff:
        if line.startswith("index ") and not FULL_INDEX.match(line):
            problems.append(f"abbreviated blob ids `{line}`: refresh writes --full-index")
            break
    for line in patch.diff:
        if RENAME.match(line):
            problems.append(f"`{line}`: refresh writes --no-renames")
            break
    return problems


def check_message(patch: Patch, budget: Budget | None) -> list:
    problems = []
    if budget is not None and not patch.subject.startswith(f"{budget.prefix}: "):
        problems.append(f"subject {patch.subject!r} does not start with this series' prefix `{budget.prefix}: `")
    if len(patch.subject) > SUBJECT_MAX:
        problems.append(f"subject is {len(patch.subject)} characters (at most {SUBJECT_MAX})")
    words = " ".join(patch.body).split()
    if len(words) < BODY_MIN_WORDS:
        problems.append(f"message body has {len(words)} words: say what the patch changes and why, and what "
                        f"DEBIAS=off does (at least {BODY_MIN_WORDS} words)")
    pointer = next((line for line in patch.body if OUTSIDE_POINTER.search(line)), None)
    if pointer is not None:
        problems.append(f"message points outside the repository ({pointer.strip()[:60]}): say it in the message, "
                        f"and cite an upstream bug as a `Bug: <url>` trailer")
    added = [line for line in patch.diff if line.startswith("+") and not line.startswith("+++")]
    private = [line for line in added if PRIVATE_API.search(line)]
    if private:
        problems.append(f"reaches into debias_core internals ({private[0].strip()[:60]}...): call the public "
                        f"API (debias, keep_cap, mask_padding, positions, sample)")
    return problems


def changed_lines(patch: Patch) -> int:
    return sum(1 for line in patch.diff
               if line[:1] in "+-" and not line.startswith(("+++ ", "--- ")) and line not in ("---", "+++"))


def lint_series(series_dir: Path, budget: Budget | None, root: Path) -> list:
    """Problems of one series, as ``(path relative to root, message)``."""
    problems = []

    def report(path: Path, message: str):
        problems.append((path.relative_to(root).as_posix(), message))

    if budget is None:
        report(series_dir, "no row in the budget table of patches/README.md (series, prefix, changed lines, "
                           "file lines)")
    files = sorted(p for p in series_dir.glob("*.patch"))
    numbers = []
    changed = total = 0
    for path in files:
        m = SERIES_FILE.match(path.name)
        if not m:
            report(path, "not named NNNN-<slug>.patch: not part of the series (rename it or remove it)")
            continue
        numbers.append(int(m[1]))
        patch, form = parse(path)
        for message in form:
            report(path, message)
        if patch is None:
            continue
        for message in check_form(patch) + check_message(patch, budget):
            report(path, message)
        if m[2] != slug(patch.subject):
            report(path, f"file name does not follow the subject (refresh would name it "
                         f"{m[1]}-{slug(patch.subject)}.patch)")
        changed += changed_lines(patch)
        total += len(patch.lines) - 1
    if numbers != list(range(1, len(numbers) + 1)):
        report(series_dir, f"patch numbers {numbers} are not 1..{len(numbers)} in order")
    if budget is not None:
        if changed > budget.changed_lines:
            report(series_dir, f"{changed} changed lines, over the budget of {budget.changed_lines} "
                               f"(split the change, or raise the budget in patches/README.md with the reason)")
        if total > budget.file_lines:
            report(series_dir, f"{total} lines of patch files, over the budget of {budget.file_lines}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="series to lint (default: every patches/<Name>/)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository root (default: this script's repository)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    patches, readme = root / "patches", root / "patches" / "README.md"
    if not patches.is_dir() or not readme.is_file():
        print(f"lint_patches: error: {patches} or its README.md is missing; pass --root <repository>", file=sys.stderr)
        return 2
    budgets = read_budgets(readme)
    if not budgets:
        print(f"lint_patches: error: no budget table in {readme} (rows `| Name | `prefix:` | n | m |`)",
              file=sys.stderr)
        return 2
    available = sorted(p.name for p in patches.iterdir() if p.is_dir())
    unknown = [n for n in args.names if n not in available]
    if unknown:
        print(f"lint_patches: error: no series {', '.join(unknown)} in patches/ (have: {', '.join(available)})",
              file=sys.stderr)
        return 2
    problems = []
    for name in args.names or available:
        problems += lint_series(patches / name, budgets.get(name), root)
    for name in sorted(set(budgets) - set(available)):
        problems.append(("patches/README.md", f"budget row for {name}, which has no patches/{name}/"))
    for where, message in problems:
        print(f"{where}: error: {message}")
    checked = args.names or available
    print(f"lint_patches: {len(checked)} series, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
