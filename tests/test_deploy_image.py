"""Offline checks of the image recipe: deploy/Dockerfile, its lock file, the build context, the image tag.

tests/e2e/test_docker.py builds and runs the image; these catch the same mistakes without an engine.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
LOCK = DEPLOY / "requirements.lock"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONFIG_PATH = "/etc/tokenhub-gateway/gateway.toml"
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)(?: ;[^\\]*)? \\$")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def _lock() -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes) from deploy/requirements.lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in LOCK.read_text().splitlines():
        if pin := PIN.match(line):
            name = canonicalize_name(pin[1])
            pins[name] = (pin[2], [])
        elif line.strip().startswith("--hash=sha256:"):
            pins[name][1].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
        elif line.strip() and not line.lstrip().startswith("#"):
            pytest.fail(f"requirements.lock: unexpected line {line!r}")
    return pins


def test_the_base_image_is_a_build_argument_for_every_stage():
    steps = _instructions()
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2 and all(f.split()[0] == "${BASE_IMAGE}" for f in froms)


def test_the_image_installs_only_the_lock_file_and_sheds_pip():
    runs = " && ".join(args for op, args in _instructions() if op == "RUN")
    assert "--require-hashes --no-deps --only-binary :all: -r /tmp/requirements.lock" in re.sub(r"\s+", " ", runs)
    assert "COPY deploy/requirements.lock /tmp/requirements.lock" in DOCKERFILE
    # The package itself is built by the locked setuptools, never an unpinned isolated one.
    assert "install --no-deps --no-build-isolation ." in runs
    assert "pip uninstall --yes setuptools pip" in runs
    runtime = DOCKERFILE[DOCKERFILE.rindex("FROM ") :]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime and "pip install" not in runtime


def test_the_runtime_stage_is_unprivileged_and_its_config_read_only():
    steps = _instructions()
    assert [args for op, args in steps if op == "USER"][-1] == "10001:10001"
    assert "install -d -o root -g root -m 0755 /etc/tokenhub-gateway" in DOCKERFILE
    assert 'ENTRYPOINT ["tokenhub-gateway"]' in DOCKERFILE
    assert f'CMD ["serve", "--config", "{CONFIG_PATH}"]' in DOCKERFILE


def test_the_healthcheck_reads_the_port_from_the_config():
    (check,) = [args for op, args in _instructions() if op == "HEALTHCHECK"]
    assert check.endswith(f'CMD ["tokenhub-gateway", "healthcheck", "--config", "{CONFIG_PATH}"]')
    assert "8080" not in check


def test_the_lock_pins_every_dependency_with_hashes():
    pins = _lock()
    wanted = [
        *PROJECT["project"]["dependencies"],
        *PROJECT["project"]["optional-dependencies"]["redis"],
        *PROJECT["build-system"]["requires"],
    ]
    for spec in map(Requirement, wanted):
        name = canonicalize_name(spec.name)
        assert name in pins, f"{spec.name} is not in deploy/requirements.lock"
        assert spec.specifier.contains(pins[name][0]), f"{name}=={pins[name][0]} does not satisfy {spec}"
    for name, (_version, hashes) in pins.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def test_the_lock_says_how_it_was_made():
    header = LOCK.read_text().splitlines()[:2]
    command = header[1].lstrip("# ")
    assert command.startswith("uv pip compile pyproject.toml deploy/requirements.in --extra redis")
    assert "--generate-hashes" in command and "--output-file deploy/requirements.lock" in command
    assert command in (DEPLOY / "README.md").read_text()


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pattern[3:]) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_the_build_context_holds_only_what_the_image_is_built_from():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [args.split()[:-1] for op, args in _instructions() if op == "COPY" and "--from" not in args]
    for source in (s for sources in copied for s in sources):
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is copied but left out of the context"
        if (ROOT / source).is_dir():
            assert not _ignored(f"{source}/cli.py", patterns)
    for kept_out in (
        ".git/config",
        "tests/test_app.py",
        "gateway.db",
        "deploy/.env",
        "deploy/config/gateway.toml",
        "gateway/__pycache__/cli.cpython-311.pyc",
        "bench/run.py",
        ".venv/bin/python",
    ):
        assert _ignored(kept_out, patterns), kept_out
    # BuildKit prefers a Dockerfile.dockerignore; a second list would drift from this one.
    assert not (DEPLOY / "Dockerfile.dockerignore").exists()


def test_one_image_tag_everywhere():
    tag = f"tokenhub-gateway:{PROJECT['project']['version']}"
    texts = {"", ".md", ".yml", ".yaml", ".toml", ".example"}
    files = [ROOT / "README.md", *sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in texts)]
    found = {m for f in files for m in re.findall(r"(?<![\w/-])tokenhub-gateway:[\w.-]+", f.read_text())}
    assert found == {tag}
    kustomization = (DEPLOY / "kubernetes" / "kustomization.yaml").read_text()
    assert f"newTag: {PROJECT['project']['version']}" in kustomization
