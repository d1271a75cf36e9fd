"""The cluster recipes in clusters/: manifests that parse and carry what Ray, KubeRay and `lsn` need,
and a local script that is valid bash and names only loopback addresses."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from lsn.cli import build_parser

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"
YAMLS = sorted(p for p in CLUSTERS.iterdir() if p.suffix in (".yaml", ".yml"))
LOCAL_SH = CLUSTERS / "local.sh"
IP = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text(encoding="utf-8"))


def harvest_options() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {opt for action in sub.choices["harvest"]._actions for opt in action.option_strings}


def parse_harvest(command: str):
    words = shlex.split(command)
    assert words[:2] == ["lsn", "harvest"], command
    return build_parser().parse_args(words[1:])


def test_yaml_files_exist_and_parse():
    names = {p.name for p in YAMLS}
    assert {"gpu-cluster.yaml", "rayjob.yaml"} <= names
    for path in YAMLS:
        assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict), path


# --- Ray cluster launcher -------------------------------------------------------------------------------

def test_launcher_has_required_keys_and_a_gpu_worker_type():
    cfg = load("gpu-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    assert cfg["provider"]["type"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        assert "resources" in node and "node_config" in node, name
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no worker type offers GPUs"
    for name, node in gpu.items():
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= cfg["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]


def test_launcher_validates_against_rays_schema():
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(load("gpu-cluster.yaml"))  # ray-schema.json plus the launcher's own checks


def test_launcher_installs_the_package_and_shares_storage():
    cfg = load("gpu-cluster.yaml")
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install" in setup and "lsn-harvester" in setup and "s3fs" in setup
    starts = "\n".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("HF_HOME=/mnt/shared/") == 2
    assert "ray start --head" in starts and "$RAY_HEAD_IP" in starts


# --- KubeRay RayJob -------------------------------------------------------------------------------------

def test_rayjob_manifest():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].strip().startswith("lsn harvest")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    groups = cluster["workerGroupSpecs"]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu", 0)
            for g in groups for c in g["template"]["spec"]["containers"]]
    assert gpus and all(int(n) >= 1 for n in gpus)


def test_rayjob_entrypoint_is_a_valid_harvest_command():
    args = parse_harvest(load("rayjob.yaml")["spec"]["entrypoint"])
    assert args.device == "cuda" and args.store.startswith("s3://")
    assert any(c.startswith("ec40:") for c in args.corpus)


def test_rayjob_volumes_are_defined():
    job = load("rayjob.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    claims = set()
    for pod in pods:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, mount
        claims |= {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    pvc = load("shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and claims == {pvc["metadata"]["name"]}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


# --- README and local script ----------------------------------------------------------------------------

def test_readme_harvest_commands_use_real_options():
    known = harvest_options()
    text = (CLUSTERS / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)
    commands = [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if "lsn harvest" in line]
    assert commands
    for line in commands:
        for flag in re.findall(r"(?<!\S)--[a-z][a-z-]*", line.split("lsn harvest", 1)[1]):
            assert flag in known, (flag, line)


def test_local_script_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", str(LOCAL_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(LOCAL_SH, os.X_OK)


def test_local_script_uses_only_loopback():
    text = LOCAL_SH.read_text(encoding="utf-8")
    addresses = set(IP.findall(text))
    assert addresses == {"127.0.0.1"}, addresses
    assert "localhost" not in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(code)
    assert "--node-ip-address" in joined and "--dashboard-host" in joined and "http://$HOST" in joined
    assert re.search(r"^HOST=127\.0\.0\.1\b", text, flags=re.M)
    for forbidden in ("ray stop", "pkill", "killall"):
        assert forbidden not in joined, forbidden
    assert "trap " in joined
    harvest = re.search(r"lsn harvest ([^\n]*)", joined).group(1)
    known = harvest_options()
    assert all(flag in known for flag in re.findall(r"--[a-z][a-z-]*", harvest))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_end_to_end(tmp_path):
    """clusters/local.sh: a loopback head, `ray job submit` of a harvest, success, a complete store, and
    the head it started stopped afterwards."""
    from harvester.store import read_attrs

    gcs, dashboard = _free_port(), _free_port()
    env = dict(os.environ, LSN_RAY_PORT=str(gcs), LSN_DASHBOARD_PORT=str(dashboard),
               LSN_STORE=str(tmp_path / "store"))
    proc = subprocess.run(["bash", str(LOCAL_SH), "--seq-len", "128", "--shard-tokens", "20000"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stderr.lower() and "total" in proc.stdout + proc.stderr
    attrs = read_attrs(tmp_path / "store")
    assert attrs["complete"] and sum(attrs["meta"]["corpus"]["tokens_per_group"]) > 0
    for port in (gcs, dashboard):  # the cluster it started is gone
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
