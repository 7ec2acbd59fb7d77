"""Which gateway code a run measures: the checkout (`--src`), its commit, and a hash of `gateway/`'s
sources, so the report can name the code and tell when it changed while the run went on."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_fingerprint(src: Path) -> str:
    """SHA-256 of the gateway package's sources, uncommitted edits included."""
    h = hashlib.sha256()
    for path in sorted((src / "gateway").rglob("*.py")):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def describe_source(src: Path) -> str:
    git = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(src), "status", "--porcelain", "--", "gateway"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    fingerprint = code_fingerprint(src)
    if git.returncode == 0:
        commit = f"commit {git.stdout.strip()}" + (" with uncommitted changes in gateway/" if dirty else "")
    elif (same := snapshot_of(fingerprint)) is not None:
        commit = f"a snapshot of commit {same}: the same gateway/ sources"
    else:
        commit = "not a git checkout"
    return f"{src} ({commit}); gateway/ sources sha256 {fingerprint}"


def snapshot_of(fingerprint: str) -> str | None:
    """The HEAD commit of this checkout when its gateway/ sources are exactly the ones measured
    (a `git archive` of it, say)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None
    listed = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "gateway"], capture_output=True)
    if listed.returncode != 0:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=listed.stdout, check=True)
        return head.stdout.strip() if code_fingerprint(Path(tmp)) == fingerprint else None
