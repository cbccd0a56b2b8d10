"""The deployment files agree with the code: docker-compose.yml, Dockerfile, Makefile, .ci/run.

No Docker here: these checks read the files, and resolve what they name against the repository.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings
from core.temporal import SEARCH_ATTRIBUTES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BUILT = sorted(name for name, service in SERVICES.items() if "build" in service)
SCALABLE = ["api", "worker"]


def command_text(service: dict[str, Any]) -> str:
    """entrypoint + command as one shell-ish string (list or string form)."""
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if isinstance(value, list):
            parts.append(" ".join(str(v) for v in value))
        elif value:
            parts.append(str(value))
    return " ".join(parts)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def build_context(service: dict[str, Any]) -> tuple[Path, Path]:
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = ROOT / build.get("context", ".")
    return context, context / build.get("dockerfile", "Dockerfile")


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_has_the_production_services() -> None:
    expected = {"postgresql", "temporal", "temporal-setup", "temporal-ui", "migrate", "api"}
    assert expected | {"worker"} <= set(SERVICES)
    assert any("mailpit" in str(s.get("image", "")) for s in SERVICES.values())


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_an_image_or_a_dockerfile(name: str) -> None:
    service = SERVICES[name]
    assert "image" in service or "build" in service, name
    if "build" in service:
        context, dockerfile = build_context(service)
        assert context.is_dir(), context
        assert dockerfile.is_file(), dockerfile


def test_the_app_services_are_built_from_this_repository() -> None:
    assert {"migrate", "api", "worker"} <= set(BUILT)


@pytest.mark.parametrize("name", SCALABLE)
def test_api_and_worker_can_be_scaled(name: str) -> None:
    service = SERVICES[name]
    assert "container_name" not in service
    for port in service.get("ports", []):
        published = str(port).rsplit(":", 1)[0] if ":" in str(port) else ""
        # A fixed host port makes a second replica fail to start; a range ("8000-8009") does not.
        assert not re.fullmatch(r"(.*:)?\d+", published), f"{name} publishes fixed port {port}"
    if name == "worker":
        assert not service.get("ports"), "workers poll Temporal; they need no published port"


def test_commands_name_modules_and_files_that_exist() -> None:
    named: list[str] = []
    for name in BUILT:
        text = command_text(SERVICES[name])
        assert text, f"{name} has no command"
        for token_list in (shlex.split(part) for part in re.split(r"&&|;|\n", text)):
            for i, token in enumerate(token_list):
                if token == "-m" and i + 1 < len(token_list):
                    named.append(f"module {token_list[i + 1]}")
                elif re.fullmatch(r"[\w/]+\.py", token):
                    named.append(f"file {token}")
                elif re.fullmatch(r"[\w.]+:\w+", token) and token_list[0] == "uvicorn":
                    named.append(f"module {token.split(':')[0]}")
    assert {"module scripts.migrate", "module scripts.seed", "file worker.py"} <= set(named)
    assert "module api.app" in named
    missing = [
        item
        for item in named
        if (item.startswith("file ") and not (ROOT / item.removeprefix("file ")).is_file())
        or (item.startswith("module ") and not module_exists(item.removeprefix("module ")))
    ]
    assert not missing, f"compose runs code that is not in the repository: {missing}"


def test_procflow_variables_are_settings_fields() -> None:
    fields = {f"PROCFLOW_{name.upper()}" for name in Settings.model_fields}
    used = set(re.findall(r"PROCFLOW_[A-Z0-9_]+", (ROOT / "docker-compose.yml").read_text()))
    assert used, "compose configures the app through PROCFLOW_* variables"
    assert used <= fields, f"not Settings fields: {sorted(used - fields)}"
    for name in BUILT:
        env = environment(SERVICES[name])
        assert env["PROCFLOW_TEMPORAL_ADDRESS"] == "temporal:7233", name
        assert env["PROCFLOW_DATABASE_URL"].startswith("postgresql+asyncpg://"), name
        # the image's WORKDIR is /app and COPY . . brings the seeds: the directory exists there
        assert env["PROCFLOW_BLUEPRINTS_DIR"] == "/app/blueprints", name
        assert (ROOT / "blueprints").is_dir() and list((ROOT / "blueprints").glob("*.yaml"))


def test_the_api_trusts_no_proxy_headers_by_itself_and_runs_in_production() -> None:
    api = SERVICES["api"]
    args = shlex.split(command_text(api))
    assert "*" not in args and not any("*" in a for a in args if "forwarded" in a), args
    assert "--proxy-headers" not in args and "--no-proxy-headers" in args, args
    env = environment(api)
    assert env["PROCFLOW_ENVIRONMENT"] == "production"
    assert "*" not in env["PROCFLOW_TRUSTED_PROXIES"]
    # the secret has no committed value: compose refuses to start without it
    assert env["PROCFLOW_JWT_SECRET"].startswith("${PROCFLOW_JWT_SECRET:?")


def test_depends_on_names_existing_services() -> None:
    for name, service in SERVICES.items():
        for target in service.get("depends_on", []):
            assert target in SERVICES, f"{name} depends on unknown service {target}"


def test_the_setup_service_registers_every_search_attribute() -> None:
    text = command_text(SERVICES["temporal-setup"])
    registered = dict(
        re.findall(r"search-attribute create\b[^\n]*?--name (\w+) --type (\w+)", text)
    )
    assert registered == SEARCH_ATTRIBUTES
    assert "--address temporal:7233" in text


def test_temporal_runs_on_postgres_and_waits_for_it() -> None:
    temporal = SERVICES["temporal"]
    assert "temporalio/auto-setup" in temporal["image"]
    env = environment(temporal)
    assert env["DB"] == "postgres12"
    assert env["POSTGRES_SEEDS"] == "postgresql"
    assert temporal["depends_on"]["postgresql"]["condition"] == "service_healthy"
    assert "healthcheck" in SERVICES["postgresql"]
    config = env["DYNAMIC_CONFIG_FILE_PATH"].rsplit("/", 1)[-1]
    mounted = [v.split(":")[0] for v in temporal.get("volumes", [])]
    assert any((ROOT / m / config).is_file() for m in mounted), "dynamic config file not mounted"


def test_the_app_waits_for_migrations_and_search_attributes() -> None:
    for name in SCALABLE:
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["temporal-setup"]["condition"] == "service_completed_successfully"


def test_mounted_deploy_files_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_the_records_database_is_created_by_the_postgres_init_script() -> None:
    url = environment(SERVICES["api"])["PROCFLOW_DATABASE_URL"]
    database = url.rsplit("/", 1)[-1]
    scripts = [
        ROOT / v.split(":")[0]
        for v in SERVICES["postgresql"]["volumes"]
        if "docker-entrypoint-initdb.d" in v
    ]
    assert scripts, "no init script mounted into postgres"
    assert any(f"CREATE DATABASE {database}" in s.read_text() for s in scripts)


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_copies_sources_that_exist() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = shlex.split(line)
        for source in sources:
            if not source.startswith("--"):
                assert (ROOT / source).exists(), f"COPY source {source} missing"
    assert "pip install" in text


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".data", ".git", ".env"} <= set(ignored)


# --- Makefile and CI -------------------------------------------------------------------------


def make_rules() -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines), with simple $(VAR) definitions expanded."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*?)\s*$", text, re.M))

    def expand(value: str) -> str:
        for _ in range(5):
            value = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), value)
        return value

    rules: dict[str, tuple[list[str], list[str]]] = {}
    recipe: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("\t") and recipe is not None:
            recipe.append(expand(line.strip()))
        elif match := re.match(r"^([^\s#=:.][^=:]*?)\s*:(?!=)(.*)$", line):  # not .PHONY
            prerequisites = expand(match.group(2)).replace("|", " ").split()
            recipe = []
            rules[expand(match.group(1))] = (prerequisites, recipe)
        else:
            recipe = None
    return rules


def recipes_for(target: str) -> list[str]:
    """Recipe lines make runs for target, prerequisites first (depth-first)."""
    rules = make_rules()
    lines: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in rules:
            return
        seen.add(name)
        prerequisites, recipe = rules[name]
        for prerequisite in prerequisites:
            visit(prerequisite)
        lines.extend(recipe)

    visit(target)
    return lines


@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("run", "-m scripts.run_stack"),
        ("test", "-m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)"),
    ],
)
def test_make_target_prepares_the_virtualenv_then_runs(target: str, command: str) -> None:
    lines = recipes_for(target)
    assert any(re.search(r"-m venv \.venv\b", line) for line in lines), lines
    install = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert "-e '.[test]'" in lines[install]
    assert any(".venv/.installed" in line for line in lines[install:]), "no install stamp"
    assert ".venv/bin/python " + command in lines[-1]


def test_the_install_is_skipped_until_pyproject_changes() -> None:
    rules = make_rules()
    prerequisites, recipe = rules[".venv/.installed"]
    assert "pyproject.toml" in prerequisites
    assert any("pip install" in line for line in recipe)


def test_make_lint_runs_ruff() -> None:
    assert any("ruff check" in line for line in recipes_for("lint"))


def test_ci_runs_make_test() -> None:
    ci = ROOT / ".ci" / "run"
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert re.search(r"^make test\b", text, re.M)
    assert ci.stat().st_mode & 0o111, ".ci/run must be executable"
