"""docker-compose.yml's milvus profile, read through the Compose v2 binary: Milvus standalone with its etcd and
MinIO, a one-shot index build, and two api replicas whose CLIPFORGE_INDEX is a location file naming the shared
collection (running it needs Milvus's images, which is the operator's step)."""

from __future__ import annotations

from pathlib import Path

from test_deploy_files import COMPOSE_FILE, _compose_config

from index.locations import MilvusLocation, parse_milvus


def _milvus_profile(env: dict[str, str] | None = None) -> dict:
    return _compose_config(COMPOSE_FILE, profiles=("milvus",), env=env)


def test_milvus_profile_runs_standalone_and_two_replicas_on_one_collection() -> None:
    cfg = _milvus_profile()
    services = cfg["services"]
    assert {"milvus", "milvus-etcd", "milvus-minio", "milvus-index", "api-milvus"} <= set(services)
    for name in ("milvus", "milvus-etcd", "milvus-minio", "milvus-index", "api-milvus"):
        assert services[name]["profiles"] == ["milvus"], name
    milvus = services["milvus"]
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "milvus-etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "milvus-minio:9000"
    assert {d: v["condition"] for d, v in milvus["depends_on"].items()} == {
        "milvus-etcd": "service_healthy", "milvus-minio": "service_healthy"}

    api = services["api-milvus"]
    assert api["deploy"]["replicas"] == 2 and api["command"] == ["serve"]
    assert api["depends_on"]["milvus-index"]["condition"] == "service_completed_successfully"
    build = services["milvus-index"]
    assert build["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    for service in (api, build):
        assert service["build"]["args"]["CLIPFORGE_EXTRAS"] == "milvus"  # the image needs pymilvus
        assert service["image"] == api["image"] != services["api"]["image"]
        target = service["environment"]["CLIPFORGE_INDEX"]
        assert [c["target"] for c in service["configs"]] == [target]
        assert not any(v.get("target") == "/var/lib/clipforge/index" for v in service.get("volumes", []))
    location = parse_milvus(cfg["configs"]["milvus-location"]["content"].strip())
    assert location == MilvusLocation("http://milvus:19530", "demo", "milvus://milvus:19530/demo", lite=False)


def test_milvus_profile_points_at_another_milvus_and_passes_the_token() -> None:
    cfg = _milvus_profile({"CLIPFORGE_MILVUS_ADDRESS": "milvus.internal.example:19530",
                           "CLIPFORGE_MILVUS_COLLECTION": "photos", "CLIPFORGE_MILVUS_TOKEN": "user:secret"})
    location = parse_milvus(cfg["configs"]["milvus-location"]["content"].strip())
    assert (location.uri, location.collection) == ("http://milvus.internal.example:19530", "photos")
    assert cfg["services"]["api-milvus"]["environment"]["CLIPFORGE_MILVUS_TOKEN"] == "user:secret"


def test_default_services_are_unchanged_without_the_profile() -> None:
    assert set(_compose_config(COMPOSE_FILE)["services"]) == {"api", "bootstrap"}
    assert Path(COMPOSE_FILE).read_text().count('profiles: ["milvus"]') == 5
