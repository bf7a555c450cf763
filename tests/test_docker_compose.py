"""docker-compose.yml, checked without a Docker engine (none runs here):
the file against the Compose specification's JSON schema, and its
contents against the code: every command is a `freshtower` subcommand with
options it accepts, every FRESHTOWER_* variable is a setting, volumes mount
where the settings put the data, health checks reach the ports the
services listen on."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import typer.main
import yaml

from freshtower.app.cli import app
from freshtower.core.settings import Settings, load_settings

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on click itself
    from click.exceptions import UsageError

ROOT = Path(__file__).resolve().parents[1]
# Compose specification schema from docker-compose 1.29.2 (tests/data/README.md).
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose_spec.json").read_text())

# Where each service writes (must be mounted read-write) and reads.
WRITES = {
    "streams": {"batches_dir"},
    "trainer-daily": {"models_dir", "scratch_dir"},
    "trainer-online": {"online_dir"},
    "publisher": {"models_dir"},  # a refused full model is marked REFUSED.json in models/; releases go to the bucket
}
READS = {
    "trainer-daily": {"batches_dir"},
    "trainer-online": {"batches_dir", "models_dir"},
    "publisher": {"online_dir"},
}
REPLICAS = ("recall-1", "recall-2")
HTTP_SERVICES = {"streams", *REPLICAS}  # the ones with an endpoint a health check can ask
OTHERS = {"kafka", "minio", "minio-init", "lb"}  # images of their own
LONG_RUNNING = {"kafka", "minio", "lb", "streams", "trainer-daily", "trainer-online", "publisher", *REPLICAS}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def image() -> dict:
    """ENTRYPOINT and ENV of the Dockerfile every freshtower service builds."""
    text = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.MULTILINE).group(1))
    env = dict(re.findall(r"^ENV\s+(\w+)=(\S+)\s*$", text, re.MULTILINE))
    return {"entrypoint": entrypoint, "env": env}


def freshtower_services(compose: dict) -> dict:
    return {name: s for name, s in compose["services"].items() if s.get("build") == "."}


def parse_command(argv: list[str]):
    """Parse ``freshtower ARGV`` as the CLI would, without running it:
    (subcommand path, the leaf command's context, whose ``params`` hold the
    parsed options). An unknown subcommand or option, or a bad value,
    raises click's ``UsageError``."""
    command = typer.main.get_command(app)
    context = command.make_context("freshtower", list(argv))
    path = []
    while hasattr(command, "resolve_command"):  # a group
        # A group's parse leaves the subcommand name in _protected_args
        # (click's own name for it) and the rest in args.
        remaining = [*context._protected_args, *context.args]
        if not remaining:
            raise UsageError(f"{' '.join(['freshtower', *path])} needs a subcommand", context)
        name, command, rest = command.resolve_command(context, remaining)
        path.append(name)
        context = command.make_context(name, rest, parent=context)
    return path, context


def interpolated(value) -> str:
    """``${VAR:-default}`` as Compose would fill it with VAR set."""
    return re.sub(r"\$\{(\w+)(:?-[^}]*)?\}", lambda m: f"value-of-{m.group(1).lower()}", str(value))


def service_settings(service: dict, image: dict, monkeypatch) -> Settings:
    """The settings a container of ``service`` resolves (image ENV, then the service's environment)."""
    for name in [k for k in os.environ if k.startswith("FRESHTOWER_")]:
        monkeypatch.delenv(name)
    environment = {**image["env"], **{k: interpolated(v) for k, v in (service.get("environment") or {}).items()}}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def mounts(service: dict) -> dict[Path, tuple[str, bool]]:
    """target -> (volume, read-only) for the short volume syntax."""
    out = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):  # a file from the repository (long syntax); see binds()
            assert entry["type"] == "bind" and entry["read_only"] is True, entry
            continue
        source, target, *mode = entry.split(":")
        out[Path(target)] = (source, mode == ["ro"])
    return out


def test_the_file_follows_the_compose_specification(compose):
    errors = sorted(jsonschema.Draft201909Validator(SCHEMA).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_misspelt_key_and_a_wrong_type(compose):
    validator = jsonschema.Draft201909Validator(SCHEMA)
    misspelt = copy.deepcopy(compose)
    misspelt["services"]["streams"]["comand"] = misspelt["services"]["streams"].pop("command")
    assert any("comand" in e.message for e in validator.iter_errors(misspelt))
    wrong_type = copy.deepcopy(compose)
    wrong_type["services"]["recall-1"]["healthcheck"]["retries"] = "three"
    assert list(validator.iter_errors(wrong_type))


def test_every_service_but_the_broker_runs_a_real_freshtower_subcommand(compose, image):
    services = freshtower_services(compose)
    assert set(compose["services"]) - set(services) == OTHERS
    assert set(services) == {"streams", "trainer-daily", "trainer-online", "publisher", *REPLICAS}
    assert image["entrypoint"] == ["freshtower"]
    commands = {}
    for name, service in services.items():
        assert "entrypoint" not in service, f"{name} must run the image's freshtower entrypoint"
        path, _ = parse_command(service["command"])
        commands[name] = path
    assert commands == {
        "streams": ["streams"],
        "trainer-daily": ["train", "daily"],
        "trainer-online": ["train", "online"],
        "publisher": ["publish"],
        "recall-1": ["serve"],
        "recall-2": ["serve"],
    }
    _, online = parse_command(compose["services"]["trainer-online"]["command"])
    assert online.params["follow"] is True  # a one-shot trainer would exit and restart forever


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "nightly"],  # no such subcommand
        ["stream"],
        ["train"],  # a group needs a subcommand
        ["train", "online", "--folow"],  # no such option
        ["serve", "--port", "eighty"],  # not an int
        ["--log-lvl", "info", "streams"],  # no such root option
    ],
)
def test_the_command_check_rejects_what_the_cli_would(argv):
    with pytest.raises(UsageError):
        parse_command(argv)


def test_every_freshtower_variable_is_a_setting(compose, image, monkeypatch):
    fields = set(Settings.model_fields)
    for name, service in freshtower_services(compose).items():
        for variable in service.get("environment") or {}:
            assert variable.startswith("FRESHTOWER_"), f"{name}: {variable} is not read by freshtower"
            assert variable.removeprefix("FRESHTOWER_").split("__")[0].lower() in fields, f"{name}: {variable} is no setting"
        service_settings(service, image, monkeypatch)  # nested names and values validate (extra="forbid")


def test_named_volumes_are_declared_used_and_mounted_where_the_code_writes(compose, image, monkeypatch):
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for target, (source, _) in mounts(service).items():
            assert source in declared, f"{name} mounts {source}, which is no named volume"
            used.add(source)
    assert used == declared

    for name, service in freshtower_services(compose).items():
        settings = service_settings(service, image, monkeypatch)
        assert settings.data_dir == Path("/data")
        data_paths = {getattr(settings, attr): attr for attr in ("batches_dir", "models_dir", "online_dir", "releases_dir", "scratch_dir")}
        mounted = mounts(service)
        for target in mounted:
            assert target in data_paths, f"{name} mounts {target}, where freshtower writes nothing"
        by_attr = {data_paths[t]: read_only for t, (_, read_only) in mounted.items()}
        for attr in WRITES.get(name, set()):
            assert by_attr.get(attr) is False, f"{name} writes {attr} but does not mount it read-write"
        for attr in READS.get(name, set()):
            assert attr in by_attr, f"{name} reads {attr} but does not mount it"


def test_the_broker_is_kraft_without_zookeeper_and_keeps_its_log_on_the_volume(compose):
    assert "zookeeper" not in json.dumps(compose).lower()
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert Path(env["KAFKA_LOG_DIRS"]) in mounts(kafka)  # the image's default log dir is off the volume
    # The services reach the broker at its advertised in-network listener.
    advertised = dict(reversed(a.split("://")) for a in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    for name, service in freshtower_services(compose).items():
        bootstrap = (service.get("environment") or {}).get("FRESHTOWER_KAFKA")
        if bootstrap is not None:
            assert advertised[bootstrap] == "PLAINTEXT", f"{name} connects to {bootstrap}, not an advertised listener"
            assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert int(env["KAFKA_NUM_PARTITIONS"]) == load_settings().streams.partitions


def test_published_ports_are_on_loopback_and_the_recall_port_is_the_one_it_serves(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    for name in REPLICAS:
        recall = compose["services"][name]
        _, serve = parse_command(recall["command"])
        assert serve.params["host"] == "0.0.0.0"  # reachable by the load balancer
        assert "ports" not in recall, f"{name} is reached through the load balancer only"
        assert recall["environment"]["FRESHTOWER_SERVICE__ADMIN_TOKEN"].startswith("${")  # from the host's environment, not the file


def test_health_checks_ask_the_ports_the_services_listen_on(compose, image, monkeypatch):
    services = compose["services"]
    assert "healthcheck" in services["kafka"]
    for name in HTTP_SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], f"{name}: the image has python, not curl or wget"
        compile(test[3], f"{name} healthcheck", "exec")
        assert re.search(r"http://127\.0\.0\.1:(\d+)/", test[3]), test[3]
    port = lambda name: int(re.search(r"127\.0\.0\.1:(\d+)/", services[name]["healthcheck"]["test"][3]).group(1))
    assert port("streams") == service_settings(services["streams"], image, monkeypatch).streams.web_port
    assert "/metrics" in services["streams"]["healthcheck"]["test"][3]
    for name in REPLICAS:
        _, serve = parse_command(services[name]["command"])
        assert port(name) == serve.params["port"] and "/healthz" in services[name]["healthcheck"]["test"][3]


def binds(service: dict) -> dict[str, Path]:
    """target -> file in the repository, for the long-syntax bind mounts."""
    return {e["target"]: ROOT / e["source"] for e in service.get("volumes", []) if isinstance(e, dict)}


def nginx_conf(compose: dict) -> str:
    return binds(compose["services"]["lb"])["/etc/nginx/conf.d/default.conf"].read_text()


def test_one_port_balances_the_replicas_at_the_ports_they_serve(compose):
    lb = compose["services"]["lb"]
    assert lb["image"].startswith("nginx:")
    assert list(binds(lb)) == ["/etc/nginx/conf.d/default.conf"] and all(p.is_file() for p in binds(lb).values())
    text = nginx_conf(compose)
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", text, re.S)
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(2), re.M)
    serve_ports = {name: str(parse_command(compose["services"][name]["command"])[1].params["port"]) for name in REPLICAS}
    assert sorted(servers) == sorted(serve_ports.items())
    assert re.search(rf"proxy_pass\s+http://{upstream.group(1)};", text)
    listen = re.search(r"^\s*listen\s+(\d+);", text, re.M).group(1)
    assert [p.split(":", 1)[1] for p in lb["ports"]] == [f"{listen}:{listen}"]  # the recall port, on the host's loopback
    assert set(lb["depends_on"]) == set(REPLICAS)
    body_limit = re.search(r"client_max_body_size\s+(\d+)k;", text).group(1)
    assert int(body_limit) * 1024 == load_settings().service.max_request_bytes


def test_the_replicas_and_the_publisher_share_one_s3_store_and_the_replicas_follow_the_topic(compose, image, monkeypatch):
    from freshtower.publisher.release_store import parse_store_url

    services = compose["services"]
    resolved = {name: service_settings(services[name], image, monkeypatch) for name in ("publisher", *REPLICAS)}
    stores = {(s.publisher.release_store, s.publisher.s3_endpoint_url, s.publisher.s3_access_key_id) for s in resolved.values()}
    assert len(stores) == 1
    (url, endpoint, _), = stores
    location = parse_store_url(url)
    assert location.scheme == "s3" and endpoint == "http://minio:9000" and services["minio"]["image"].startswith("minio/minio:")
    assert f"store/{location.bucket}" in " ".join(services["minio-init"]["command"])  # the bucket the init job creates
    for name in ("publisher", *REPLICAS):
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["FRESHTOWER_PUBLISHER__S3_SECRET_ACCESS_KEY"].startswith("${")  # from the host
    for name in REPLICAS:
        assert resolved[name].service.follow_topic and resolved[name].kafka == "kafka:9092"


def test_long_running_services_restart_and_the_one_shot_job_does_not(compose):
    for name, service in compose["services"].items():
        expected = "unless-stopped" if name in LONG_RUNNING else "no"
        assert service.get("restart") == expected, f"{name}: restart {service.get('restart')!r}, expected {expected!r}"
    assert set(compose["services"]) == LONG_RUNNING | {"minio-init"}
