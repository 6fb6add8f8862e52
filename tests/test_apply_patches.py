"""Hermetic tests of scripts/apply_patches.sh and scripts/refresh_patches.sh (need only git and bash).

Each test gets a throwaway superproject in tmp_path: a fake upstream repository (commits c1, c2 = the pin,
c3), a superproject with scripts/ copied from this repository, a populated submodule third_party/Up at
the pin and an unpopulated one third_party/Other, and a patch series made with plain `git format-patch`
from a scratch clone (0001 edits a file, 0002 adds a tracked file and an ignored one, 0003 adds an
executable). The scripts are run from outside the project, as users may.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["scripts/apply_patches.sh", "scripts/refresh_patches.sh", "scripts/lib/patches.sh"]

if shutil.which("git") is None or shutil.which("bash") is None:  # pragma: no cover
    pytest.skip("git and bash are needed to test the patch scripts", allow_module_level=True)


def _env(base: Path) -> dict:
    cfg = base / "gitconfig"
    cfg.write_text("[init]\n\tdefaultBranch = main\n[protocol \"file\"]\n\tallow = always\n"
                   "[advice]\n\tdetachedHead = false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_GLOBAL=str(cfg), GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="debias maintainers", GIT_AUTHOR_EMAIL="debias@localhost",
               GIT_COMMITTER_NAME="debias maintainers", GIT_COMMITTER_EMAIL="debias@localhost",
               GIT_AUTHOR_DATE="2024-01-02T03:04:05+00:00", GIT_COMMITTER_DATE="2024-01-02T03:04:05+00:00")
    return env


def git(env: dict, cwd: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise AssertionError(f"git {' '.join(args)} failed in {cwd}:\n{r.stdout}\n{r.stderr}")
    return r.stdout.strip()


def write(path: Path, text: str, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        path.chmod(mode)


def build_template(base: Path) -> dict:
    env = _env(base)
    up = base / "up"
    up.mkdir()
    git(env, up, "init", "-q")
    write(up / "f.py", "a\nb\nc\n")
    write(up / "README", "upstream\n")
    write(up / ".gitignore", "*.log\n")
    write(up / "big.bin", "pretend this blob is large\n")
    git(env, up, "add", ".")
    git(env, up, "commit", "-qm", "c1")
    c1 = git(env, up, "rev-parse", "HEAD")
    write(up / "f.py", "a\nb\nc\nd\n")
    git(env, up, "commit", "-qam", "c2")
    pin = git(env, up, "rev-parse", "HEAD")
    write(up / "f.py", "a\nb\nc\nd\ne\n")
    git(env, up, "commit", "-qam", "c3")
    c3 = git(env, up, "rev-parse", "HEAD")

    proj = base / "proj"
    proj.mkdir()
    git(env, proj, "init", "-q")
    for rel in SCRIPTS:
        dst = proj / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst)
    git(env, proj, "add", "scripts")
    for name in ("Up", "Other"):
        git(env, proj, "submodule", "add", "-q", str(up), f"third_party/{name}")
        git(env, proj / "third_party" / name, "checkout", "-q", pin)
        git(env, proj, "add", f"third_party/{name}")
    git(env, proj, "commit", "-qm", "superproject")
    git(env, proj, "submodule", "deinit", "-q", "-f", "third_party/Other")

    work = base / "work"
    git(env, base, "clone", "-q", str(up), str(work))
    git(env, work, "checkout", "-q", "-b", "debias", pin)
    write(work / "f.py", "a\nB\nc\nd\n")
    git(env, work, "commit", "-qam", "Change b to B", "-m", "Why: the test needs an edit.")
    write(work / "pkg" / "new.py", "print('new')\n")
    write(work / "new.log", "a file upstream's .gitignore ignores\n")
    git(env, work, "add", "-f", "pkg/new.py", "new.log")
    git(env, work, "commit", "-qm", "Add pkg/new.py and new.log")
    write(work / "run.sh", "#!/bin/sh\necho run\n", 0o755)
    git(env, work, "add", "run.sh")
    git(env, work, "commit", "-qm", "Add an executable run.sh")

    series = base / "series"
    git(env, work, "format-patch", "-q", "-o", str(series), f"{pin}..HEAD")
    return dict(c1=c1, pin=pin, c3=c3)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    base = tmp_path_factory.mktemp("template")
    return base, build_template(base)


class Project:
    def __init__(self, base: Path, shas: dict):
        self.base = base
        self.env = _env(base)
        self.root = base / "proj"
        self.sub = self.root / "third_party" / "Up"
        self.other = self.root / "third_party" / "Other"
        self.work = base / "work"
        self.series = sorted((base / "series").glob("*.patch"))
        self.pin, self.c1, self.c3 = shas["pin"], shas["c1"], shas["c3"]
        self.outside = base / "elsewhere"
        self.outside.mkdir(exist_ok=True)

    def git(self, cwd: Path, *args: str) -> str:
        return git(self.env, cwd, *args)

    def run(self, script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.root / "scripts" / script), *args], cwd=cwd or self.outside,
                              env=self.env, capture_output=True, text=True)

    def apply(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("apply_patches.sh", *args, **kw)

    def refresh(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("refresh_patches.sh", *args, **kw)

    def install(self, files: list[Path], names: list[str] | None = None, name: str = "Up",
                record: bool = True) -> Path:
        """Copy a series into patches/<name>/ and, as a maintainer would, record its result (series.tree)
        where the series applies (a broken one or an unpopulated submodule gets no record)."""
        d = self.root / "patches" / name
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            shutil.copy2(f, d / (names[i] if names else f.name))
        if record:
            self.apply("--record", name)
        return d

    def index_bytes(self, sub: Path | None = None) -> bytes:
        sub = sub or self.sub
        p = Path(self.git(sub, "rev-parse", "--git-path", "index"))
        return (p if p.is_absolute() else sub / p).read_bytes()

    def object_count(self) -> int:
        p = Path(self.git(self.sub, "rev-parse", "--git-path", "objects"))
        p = p if p.is_absolute() else self.sub / p
        return sum(1 for q in p.rglob("*") if q.is_file())


@pytest.fixture
def proj(template, tmp_path):
    base, shas = template
    copy = tmp_path / "t"
    shutil.copytree(base, copy, symlinks=True)
    return Project(copy, shas)


def snapshot(d: Path) -> dict:
    """Every path under d except .git: bytes and permission bits (files), link targets, directories."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if rel.parts[0] == ".git":
            continue
        if p.is_symlink():
            out[str(rel)] = ("link", os.readlink(p))
        elif p.is_dir():
            out[str(rel)] = ("dir",)
        else:
            out[str(rel)] = (p.read_bytes(), p.stat().st_mode & 0o777)
    return out


def out(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


# --- apply / re-apply / reverse ------------------------------------------------------------------------

def test_apply_reaches_the_committed_state_then_reapply_is_a_noop(proj):
    proj.install(proj.series)
    before, index = snapshot(proj.sub), proj.index_bytes()
    r = proj.apply()
    assert r.returncode == 0, out(r)
    assert "Up: applied 3 patch(es)" in r.stdout
    # The patched tree is exactly the scratch clone's tip, including the ignored file and the exec bit.
    assert snapshot(proj.sub) == snapshot(proj.work)
    assert (proj.sub / "run.sh").stat().st_mode & 0o111
    assert snapshot(proj.sub) != before
    assert proj.git(proj.sub, "rev-parse", "HEAD") == proj.pin
    assert proj.index_bytes() == index, "the submodule's index must never be written"

    applied = snapshot(proj.sub)
    r = proj.apply("Up")
    assert r.returncode == 0, out(r)
    assert "already applied" in r.stdout
    assert snapshot(proj.sub) == applied


def test_reverse_restores_the_pin_and_removes_created_files(proj):
    proj.install(proj.series)
    before, index = snapshot(proj.sub), proj.index_bytes()
    assert proj.apply().returncode == 0
    r = proj.apply("--reverse", "Up")
    assert r.returncode == 0, out(r)
    assert "reversed 3 patch(es)" in r.stdout
    assert snapshot(proj.sub) == before
    assert not (proj.sub / "pkg").exists() and not (proj.sub / "new.log").exists()
    assert proj.index_bytes() == index
    assert proj.git(proj.sub, "status", "--porcelain", "--ignored") == ""
    r = proj.apply("--reverse")
    assert r.returncode == 0, out(r)
    assert "not applied" in r.stdout
    assert snapshot(proj.sub) == before


def test_runs_from_any_directory_including_inside_the_submodule(proj):
    proj.install(proj.series)
    r = proj.apply("Up", cwd=proj.sub)
    assert r.returncode == 0, out(r)
    assert snapshot(proj.sub) == snapshot(proj.work)
    r = proj.apply("--reverse", cwd=proj.root / "scripts")
    assert r.returncode == 0, out(r)
    assert not (proj.sub / "run.sh").exists()


def test_unrelated_untracked_files_are_left_alone(proj):
    proj.install(proj.series)
    write(proj.sub / "notes.txt", "mine\n")
    assert proj.apply().returncode == 0
    assert (proj.sub / "notes.txt").read_text() == "mine\n"
    assert proj.apply("--reverse").returncode == 0
    assert (proj.sub / "notes.txt").read_text() == "mine\n"


# --- check / status -------------------------------------------------------------------------------------

def test_check_reports_a_good_series_and_writes_nothing(proj):
    proj.install(proj.series)
    before, objects = snapshot(proj.sub), proj.object_count()
    r = proj.apply("--check")
    assert r.returncode == 0, out(r)
    assert "3 patch(es) apply cleanly at the pin" in r.stdout
    assert snapshot(proj.sub) == before
    assert proj.object_count() == objects, "--check must not write objects into the submodule"


def test_check_works_when_head_is_elsewhere(proj):
    proj.install(proj.series)
    proj.git(proj.sub, "checkout", "-q", proj.c3)
    r = proj.apply("--check", "Up")
    assert r.returncode == 0, out(r)


def status_fields(text: str, name: str) -> dict:
    line = next(l for l in text.splitlines() if l.split()[0] == name)
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def test_status_one_line_per_submodule(proj):
    proj.install(proj.series)
    objects = proj.object_count()
    r = proj.apply("--status")
    assert r.returncode == 0, out(r)
    assert len(r.stdout.splitlines()) == 2
    assert status_fields(r.stdout, "Other") == dict(populated="no", **{"at-pin": "-"}, applied="-", dirty="-",
                                                    patches="0")
    up = status_fields(r.stdout, "Up")
    assert (up["populated"], up["at-pin"], up["applied"], up["dirty"], up["patches"]) == \
        ("yes", "yes", "no", "no", "3")

    proj.apply()
    up = status_fields(proj.apply("--status", "Up").stdout, "Up")
    assert (up["applied"], up["dirty"]) == ("yes", "no")

    write(proj.sub / "pkg" / "new.py", "edited\n")
    up = status_fields(proj.apply("--status", "Up").stdout, "Up")
    assert (up["applied"], up["dirty"]) == ("no", "yes")

    proj.git(proj.sub, "checkout", "-q", "-f", proj.c3)
    up = status_fields(proj.apply("--status", "Up").stdout, "Up")
    assert up["at-pin"].startswith("no") and proj.c3[:12] in up["at-pin"] and proj.pin[:12] in up["at-pin"]
    assert proj.object_count() == objects, "--status must not write objects into the submodule"


# --- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["c1", "c3"])
def test_refuses_when_head_is_not_the_pin_naming_both_shas(proj, where):
    proj.install(proj.series)
    head = getattr(proj, where)
    proj.git(proj.sub, "checkout", "-q", head)
    before = snapshot(proj.sub)
    r = proj.apply("Up")
    assert r.returncode == 4, out(r)
    assert head in r.stderr and proj.pin in r.stderr
    assert snapshot(proj.sub) == before


def test_refuses_a_dirty_submodule(proj):
    proj.install(proj.series)
    write(proj.sub / "f.py", "local edit\n")
    before, index = snapshot(proj.sub), proj.index_bytes()
    r = proj.apply()
    assert r.returncode == 5, out(r)
    assert "local changes" in r.stderr and "f.py" in r.stderr
    assert snapshot(proj.sub) == before and proj.index_bytes() == index


def test_refuses_when_a_file_the_series_creates_already_exists(proj):
    proj.install(proj.series)
    write(proj.sub / "new.log", "someone else's log\n")   # ignored by upstream's .gitignore
    before = snapshot(proj.sub)
    r = proj.apply()
    assert r.returncode == 5, out(r)
    assert "new.log" in r.stderr
    assert snapshot(proj.sub) == before


def test_reverse_refuses_a_modified_applied_state(proj):
    proj.install(proj.series)
    assert proj.apply().returncode == 0
    write(proj.sub / "pkg" / "new.py", "edited after applying\n")
    before = snapshot(proj.sub)
    r = proj.apply("--reverse")
    assert r.returncode == 5, out(r)
    assert "pkg/new.py" in r.stderr
    assert snapshot(proj.sub) == before
    r = proj.apply()
    assert r.returncode == 5, out(r)
    assert snapshot(proj.sub) == before


def test_all_or_nothing_when_a_later_patch_fails(proj):
    change, add, _ = proj.series
    # 0001 creates files, 0002 edits f.py, 0003 repeats that edit and cannot apply after it.
    proj.install([add, change, change], names=["0001-add.patch", "0002-change.patch", "0003-change-again.patch"])
    before, index = snapshot(proj.sub), proj.index_bytes()
    for args in ([], ["Up"], ["--check"]):
        r = proj.apply(*args)
        assert r.returncode == 6, out(r)
        assert "0003-change-again.patch does not apply" in r.stderr
        assert snapshot(proj.sub) == before, "a failed series must leave the submodule byte-for-byte as before"
        assert proj.index_bytes() == index
    assert not (proj.sub / "pkg").exists()
    up = status_fields(proj.apply("--status").stdout, "Up")
    assert up["applied"].startswith("broken") and up["dirty"] == "no"


def test_failure_in_one_submodule_does_not_block_another(proj):
    proj.install(proj.series)
    proj.install(proj.series, name="Other")
    r = proj.apply()
    assert r.returncode == 3, out(r)
    assert "Up: applied 3 patch(es)" in r.stdout
    assert snapshot(proj.sub) == snapshot(proj.work)


# --- unpopulated submodule, no series, usage ----------------------------------------------------------

def test_unpopulated_submodule_says_how_to_populate_it(proj):
    proj.install(proj.series, name="Other")
    assert proj.other.is_dir() and not any(proj.other.iterdir())
    r = proj.apply("Other")
    assert r.returncode == 3, out(r)
    assert "not populated" in r.stderr
    assert "git submodule update --init third_party/Other" in r.stderr
    assert not any(proj.other.iterdir())
    # The command it names works, and then the series applies.
    proj.git(proj.root, "submodule", "update", "--init", "third_party/Other")
    assert proj.apply("--record", "Other").returncode == 0   # install() could not record it unpopulated
    r = proj.apply("Other")
    assert r.returncode == 0, out(r)
    assert snapshot(proj.other) == snapshot(proj.work)


def test_no_series_yet(proj):
    assert not (proj.root / "patches").exists()
    before = snapshot(proj.sub)
    r = proj.apply()
    assert r.returncode == 0, out(r)
    assert "no patch series" in r.stdout
    r = proj.apply("Up")
    assert r.returncode == 0, out(r)
    assert "no patch series" in r.stdout
    (proj.root / "patches" / "Up").mkdir(parents=True)
    r = proj.apply("--reverse")
    assert r.returncode == 0, out(r)
    assert "no patch series" in r.stdout
    assert snapshot(proj.sub) == before


def test_usage_errors_and_help(proj):
    r = proj.apply("--help")
    assert r.returncode == 0
    for code in range(7):
        assert re.search(rf"^\s+{code}\s+\S", r.stdout, re.M), f"exit code {code} is not documented"
    assert proj.apply("--bogus").returncode == 2
    r = proj.apply("Nope")
    assert r.returncode == 2 and "Nope" in r.stderr and "Up" in r.stderr
    assert proj.apply("--check", "--reverse").returncode == 2
    proj.install(proj.series, name="Stray")
    r = proj.apply()
    assert r.returncode == 2 and "patches/Stray/" in r.stderr


def test_sparse_checkout_with_absent_files(proj):
    """Our real submodules are sparse where a snapshot lacks blobs: skip-worktree files are not changes."""
    proj.git(proj.sub, "update-index", "-q", "--refresh")   # the copied checkout has stale stat data
    proj.git(proj.sub, "sparse-checkout", "set", "--no-cone", "/*", "!/big.bin")
    assert not (proj.sub / "big.bin").exists()
    proj.install(proj.series)
    up = status_fields(proj.apply("--status", "Up").stdout, "Up")
    assert up["dirty"] == "no"
    before = snapshot(proj.sub)
    assert proj.apply().returncode == 0
    assert "already applied" in proj.apply().stdout
    assert proj.apply("--reverse").returncode == 0
    assert snapshot(proj.sub) == before


def test_sparse_checkout_lacking_a_patched_file_is_refused(proj):
    proj.git(proj.work, "checkout", "-q", "-b", "big", proj.pin)
    write(proj.work / "big.bin", "patched\n")
    proj.git(proj.work, "commit", "-qam", "Patch big.bin")
    patch = proj.git(proj.work, "format-patch", "-o", str(proj.base / "big"), f"{proj.pin}..big")
    proj.install([Path(patch)])
    proj.git(proj.sub, "update-index", "-q", "--refresh")
    proj.git(proj.sub, "sparse-checkout", "set", "--no-cone", "/*", "!/big.bin")
    before = snapshot(proj.sub)
    r = proj.apply()
    assert r.returncode == 1, out(r)
    assert "missing from the checkout" in r.stderr and "big.bin" in r.stderr
    assert snapshot(proj.sub) == before


# --- refresh_patches.sh ------------------------------------------------------------------------------

def test_refresh_round_trip_is_byte_identical(proj):
    r = proj.refresh("Up", "--from", str(proj.work))
    assert r.returncode == 0, out(r)
    d = proj.root / "patches" / "Up"
    files = sorted(d.glob("*.patch"))
    assert [f.name[:5] for f in files] == ["0001-", "0002-", "0003-"]
    assert r.stdout.count("added") == 3 and "recorded patches/Up/series.tree (3 patch(es)" in r.stdout
    text = files[0].read_text()
    assert text.startswith("From 0000000000000000000000000000000000000000 ")
    assert "[PATCH 1/3]" not in text and "Subject: [PATCH] Change b to B" in text
    assert "Why: the test needs an edit." in text
    assert not re.search(r"^-- $", text, re.M), "no signature (it carries the git version)"
    first = {f.name: f.read_bytes() for f in files}

    # Replay the series with git am in a fresh clone at the pin and regenerate: identical bytes.
    again = proj.base / "again"
    proj.git(proj.base, "clone", "-q", str(proj.base / "up"), str(again))
    proj.git(again, "checkout", "-q", "-b", "x", proj.pin)
    proj.git(again, "am", "-q", *[str(f) for f in files])
    r = proj.refresh("Up", "--from", str(again))
    assert r.returncode == 0, out(r)
    assert "up to date" in r.stdout and r.stdout.count("unchanged") == 3
    assert {f.name: f.read_bytes() for f in sorted(d.glob("*.patch"))} == first

    # The regenerated series reproduces the commits' tree exactly (once recorded, as a maintainer does).
    assert proj.apply("--record", "Up").returncode == 0
    assert proj.apply().returncode == 0
    assert snapshot(proj.sub) == snapshot(proj.work)


def test_refresh_updates_removes_stale_and_dry_run(proj):
    # Plain format-patch output: differs from refresh's stable form. Not recorded: refresh_patches.sh checks
    # its result with apply_patches.sh --check, which a record of the series before the refresh would fail.
    d = proj.install(proj.series, record=False)
    write(d / "0009-obsolete.patch", "stale\n")
    write(d / "README", "kept\n")
    r = proj.refresh("Up", "--from", str(proj.work), "--dry-run")
    assert r.returncode == 7, out(r)
    assert "0009-obsolete.patch" in r.stdout and (d / "0009-obsolete.patch").exists()
    r = proj.refresh("Up", "--from", str(proj.work))
    assert r.returncode == 0, out(r)
    assert "removed   0009-obsolete.patch" in r.stdout and "updated" in r.stdout
    assert not (d / "0009-obsolete.patch").exists() and (d / "README").read_text() == "kept\n"
    r = proj.refresh("Up", "--from", str(proj.work), "--dry-run")
    assert r.returncode == 0 and "up to date" in r.stdout

    # Dropping the last commit removes its patch.
    proj.git(proj.work, "reset", "-q", "--hard", "HEAD~1")
    r = proj.refresh("Up", "--from", str(proj.work))
    assert r.returncode == 0, out(r)
    assert len(list(d.glob("*.patch"))) == 2 and "removed   0003-" in r.stdout


def test_refresh_from_the_submodule_itself_and_from_a_branch(proj):
    proj.refresh("Up", "--from", str(proj.work))
    d = proj.root / "patches" / "Up"
    first = {f.name: f.read_bytes() for f in d.glob("*.patch")}
    proj.git(proj.sub, "checkout", "-q", "-b", "debias", proj.pin)
    proj.git(proj.sub, "am", "-q", *[str(f) for f in sorted(d.glob("*.patch"))])
    r = proj.refresh("Up")                       # default source: third_party/Up HEAD
    assert r.returncode == 0, out(r)
    assert r.stdout.count("unchanged") == 3
    proj.git(proj.sub, "checkout", "-q", proj.pin)
    r = proj.refresh("Up", "--from", "debias")   # a branch of third_party/Up
    assert r.returncode == 0, out(r)
    assert {f.name: f.read_bytes() for f in d.glob("*.patch")} == first


def test_refresh_refusals(proj):
    r = proj.refresh("Up")                       # HEAD is the pin: nothing on top
    assert r.returncode == 5 and "no commits on top" in r.stderr
    proj.git(proj.sub, "checkout", "-q", proj.c1)
    r = proj.refresh("Up")                       # an ancestor of the pin
    assert r.returncode == 4 and proj.pin in r.stderr
    r = proj.refresh("Up", "--from", str(proj.base / "missing-dir"))
    assert r.returncode == 3
    assert proj.refresh().returncode == 2
    assert proj.refresh("Nope").returncode == 2
    assert not (proj.root / "patches").exists()


# --- the recorded result of a series (patches/<Name>/series.tree) --------------------------------------

def _truncate_last_file(patch: Path) -> None:
    """Cut a patch before its last `diff --git` section: what an interrupted download or copy leaves, and
    still a well-formed patch that applies."""
    text = patch.read_text()
    cut = text.rindex("\ndiff --git ")
    patch.write_text(text[:cut + 1])


def test_a_truncated_patch_file_is_never_reported_applied(proj):
    d = proj.install(proj.series)
    assert (d / "series.tree").is_file()
    _truncate_last_file(next(d.glob("0002-*.patch")))      # loses new.log, still applies
    before, index = snapshot(proj.sub), proj.index_bytes()
    for args in ([], ["Up"], ["--check", "Up"], ["--reverse", "Up"]):
        r = proj.apply(*args)
        assert r.returncode == 6, out(r)
        assert "does not produce the recorded result" in r.stderr and "applied 3" not in r.stdout
        assert snapshot(proj.sub) == before and proj.index_bytes() == index
    up = status_fields(proj.apply("--status", "Up").stdout, "Up")
    assert up["applied"] == "broken(not-the-recorded-result)"


def test_a_patch_edited_after_applying_is_not_already_applied(proj):
    d = proj.install(proj.series)
    assert proj.apply().returncode == 0
    applied = snapshot(proj.sub)
    first = next(d.glob("0001-*.patch"))
    first.write_text(first.read_text().replace("\n+B\n", "\n+X\n"))   # same shape, other content
    for args in ([], ["--reverse"]):
        r = proj.apply(*args)
        assert r.returncode == 6, out(r)
        assert "truncated or edited" in r.stderr and "already applied" not in r.stdout
        assert snapshot(proj.sub) == applied


def test_record_missing_malformed_or_for_another_pin(proj):
    d = proj.install(proj.series, record=False)
    before = snapshot(proj.sub)
    r = proj.apply()
    assert r.returncode == 6 and "series.tree is missing" in r.stderr and "--record Up" in r.stderr, out(r)
    r = proj.apply("--check")                   # --check only notes it: refresh_patches.sh runs it on new series
    assert r.returncode == 0 and "note: patches/Up/series.tree is missing" in r.stdout, out(r)
    (d / "series.tree").write_text("pin nonsense\n")
    r = proj.apply()
    assert r.returncode == 6 and "malformed" in r.stderr, out(r)
    r = proj.apply("--record", "Up")
    assert r.returncode == 0 and "recorded patches/Up/series.tree" in r.stdout, out(r)
    text = (d / "series.tree").read_text()
    assert f"pin {proj.pin}\n" in text
    (d / "series.tree").write_text(text.replace(proj.pin, proj.c1))
    r = proj.apply()
    assert r.returncode == 6 and "recorded for the pin" in r.stderr, out(r)
    assert snapshot(proj.sub) == before
    (d / "series.tree").write_text(text)
    assert proj.apply().returncode == 0
    assert snapshot(proj.sub) == snapshot(proj.work)


def test_record_refuses_a_series_that_does_not_apply(proj):
    change, add, _ = proj.series
    d = proj.install([add, change, change], names=["0001-a.patch", "0002-c.patch", "0003-c.patch"])
    r = proj.apply("--record", "Up")
    assert r.returncode == 6 and not (d / "series.tree").exists(), out(r)


# --- closed stdout and interrupts ---------------------------------------------------------------------------

def test_status_into_a_closed_pipe_prints_no_errors(proj):
    """`apply_patches.sh --status | head -1`: once the reader is gone the script stops quietly."""
    proj.install(proj.series)
    read_end, write_end = os.pipe()
    os.close(read_end)                            # a reader that has already gone, like head after one line
    try:
        r = subprocess.run(["bash", str(proj.root / "scripts" / "apply_patches.sh"), "--status"],
                           cwd=proj.outside, env=proj.env, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert r.stderr == ""
    assert r.returncode == 141                    # killed by SIGPIPE, as `yes | head -1` is


def _interrupting_git(proj: Project, when: str) -> dict:
    """PATH with a `git` that sends SIGINT to its process group (as Ctrl-C does) once, the first time it is
    called for ``when``: "write" = the `git apply` that writes a working tree, "compute" = the first tree
    comparison before any write. Returns the environment for the script (TMPDIR: an empty folder)."""
    bindir = proj.base / "fakebin"
    bindir.mkdir()
    real = shutil.which("git")
    test = {"write": '[[ " $* " == *" apply "* && " $* " != *" --cached "* ]]',
            "compute": '[[ " $* " == *" diff-tree "* ]]'}[when]
    write(bindir / "git", f"""#!/usr/bin/env bash
if {test} && mkdir "{proj.base}/fired" 2>/dev/null; then kill -INT 0; fi
exec "{real}" "$@"
""", 0o755)
    tmp = proj.base / "tmp"
    tmp.mkdir()
    return {**proj.env, "PATH": f"{bindir}:{os.environ['PATH']}", "TMPDIR": str(tmp)}


@pytest.mark.parametrize("when", ["compute", "write"])
def test_an_interrupt_leaves_every_submodule_as_it_was_or_done_and_says_so(proj, when):
    proj.git(proj.root, "submodule", "update", "--init", "-q", "third_party/Other")
    proj.install(proj.series, name="Other")
    proj.install(proj.series, name="Up")
    pristine = snapshot(proj.sub)
    assert snapshot(proj.other) == pristine
    env = _interrupting_git(proj, when)
    r = subprocess.run(["bash", str(proj.root / "scripts" / "apply_patches.sh")], cwd=proj.outside, env=env,
                       capture_output=True, text=True, start_new_session=True)   # its own process group
    assert (proj.base / "fired").is_dir(), "the fake git never interrupted the run"
    assert r.returncode == 130, out(r)
    # "Other" is handled first (sorted): it was being handled when the signal came; "Up" was never reached.
    if when == "write":
        assert snapshot(proj.other) == snapshot(proj.work)
        assert "Other: applied 3 patch(es)" in r.stdout
        assert "interrupted: Other had already reached its final state" in r.stderr
    else:
        assert snapshot(proj.other) == pristine
        assert "interrupted: third_party/Other was left as it was" in r.stderr
    assert "not handled, left as they were: Up" in r.stderr
    assert snapshot(proj.sub) == pristine
    assert list((proj.base / "tmp").iterdir()) == [], "temporary folders left behind"
    r = proj.apply()                               # a rerun finishes the job
    assert r.returncode == 0, out(r)
    assert snapshot(proj.sub) == snapshot(proj.other) == snapshot(proj.work)
