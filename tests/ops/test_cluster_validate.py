"""``ttm-ray cluster validate``: the shipped cluster definitions pass; broken copies fail
naming the file and the field; the CLI's exit codes; the cron submitter; the upload size."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from jobs import cli
from jobs import cluster as cluster_cli
from ttm_ray.ops import Problem, validate_cluster

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """Writable copies of cluster/ and jobs/configs/."""
    cluster_dir = tmp_path / "cluster"
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "cluster", cluster_dir)
    shutil.copytree(REPO / "jobs" / "configs", configs)
    return cluster_dir, configs


def edit(path: Path, change: Callable[[dict], None], index: int = 0) -> None:
    """Load a (multi-document) YAML file, change one document, write it back."""
    docs = list(yaml.safe_load_all(path.read_text()))
    change(docs[index])
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def fields(problems: list[Problem], file: Path) -> dict[str, str]:
    return {p.field: p.message for p in problems if p.file == str(file)}


def test_shipped_cluster_definitions_pass() -> None:
    assert validate_cluster(REPO / "cluster", REPO / "jobs" / "configs") == []


def test_shipped_files_are_what_the_checks_see() -> None:
    """The validator found both launcher YAMLs and the RayCluster: breaking each is noticed
    (guards against a check that silently matches no file)."""
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    train = aws["available_node_types"]["train_a100"]
    assert train["resources"]["train_gpu"] == 8
    assert train["resources"]["accelerator_type:A100-80G"] >= 1
    assert train["max_workers"] == 4 and train["min_workers"] == 0
    assert aws["available_node_types"]["head"]["resources"] == {"CPU": 0}
    image = (REPO / "cluster" / "image.env").read_text().split("TTM_IMAGE=")[1].split()[0]
    assert aws["docker"]["image"] == image


def test_wrong_type_in_launcher(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    aws = cluster_dir / "aws.yaml"
    edit(aws, lambda c: c["available_node_types"]["train_a100"].update(max_workers="four"))
    found = fields(validate_cluster(cluster_dir, configs), aws)
    assert "is not of type 'integer'" in found["available_node_types.train_a100.max_workers"]


def test_unknown_key_in_node_type(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    gcp = cluster_dir / "gcp.yaml"
    edit(gcp, lambda c: c["available_node_types"]["cpu_workers"].update(min_worker=1))
    found = fields(validate_cluster(cluster_dir, configs), gcp)
    assert found == {"available_node_types.cpu_workers.min_worker":
                     "unknown key (not in the schema)"}


def test_unknown_key_in_raycluster_spec(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    rc = cluster_dir / "kuberay" / "raycluster.yaml"
    edit(rc, lambda d: d["spec"].update(enableAutoscaling=True))
    found = fields(validate_cluster(cluster_dir, configs), rc)
    assert found == {"spec.enableAutoscaling": "unknown key (not in the schema)"}


def test_pod_template_checked_against_kubernetes_schema(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    rc = cluster_dir / "kuberay" / "raycluster.yaml"

    def break_pod(d: dict) -> None:
        container = d["spec"]["workerGroupSpecs"][2]["template"]["spec"]["containers"][0]
        container["imagePullPolicyy"] = "Always"
        d["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # CRD wants strings

    edit(rc, break_pod)
    found = fields(validate_cluster(cluster_dir, configs), rc)
    pod = "spec.workerGroupSpecs[2].template.spec.containers[0]"
    assert found[f"{pod}.imagePullPolicyy"] == "unknown key (not in the schema)"
    assert "is not of type 'string'" in found["spec.headGroupSpec.rayStartParams.num-cpus"]


def test_cronjob_wrong_type_and_literal_token(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    cron = cluster_dir / "kuberay" / "cronjob-rebuild.yaml"

    def break_cron(d: dict) -> None:
        d["spec"]["successfulJobsHistoryLimit"] = "three"
        container = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        container["env"][1] = {"name": "RAY_AUTH_TOKEN", "value": "not-a-real-token"}

    edit(cron, break_cron)
    found = fields(validate_cluster(cluster_dir, configs), cron)
    assert "is not of type" in found["spec.successfulJobsHistoryLimit"]
    env = "spec.jobTemplate.spec.template.spec.containers[0].env[1].value"
    assert "literal" in found[env]


def test_job_config_asking_for_a_resource_no_node_has(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    prod = configs / "prep" / "production.yaml"
    edit(prod, lambda c: c["resources"]["caption"].update(custom_resources={"gpu_big": 1}))
    problems = [p for p in validate_cluster(cluster_dir, configs) if p.file == str(prod)]
    field = "resources.caption.custom_resources.gpu_big"
    # one problem per cluster definition: aws.yaml, gcp.yaml, the RayCluster
    assert {p.field for p in problems} == {field}
    clusters = sorted(p.message.split("node type of ")[1] for p in problems)
    assert clusters == [str(cluster_dir / "aws.yaml"), str(cluster_dir / "gcp.yaml"),
                        f"{cluster_dir / 'kuberay' / 'raycluster.yaml'} (RayCluster ttm-ray)"]


def test_training_group_too_small_for_32_workers(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    aws = cluster_dir / "aws.yaml"
    edit(aws, lambda c: c["available_node_types"]["train_a100"].update(max_workers=3))
    problems = validate_cluster(cluster_dir, configs)
    stage1 = fields(problems, configs / "train" / "dit_stage1.yaml")
    assert "room for 24" in stage1["scaling.num_workers"]
    assert str(aws) in stage1["scaling.num_workers"]
    # every paper run inherits the same scaling; the tiny CPU runs ask for nothing
    failing = {Path(p.file).name for p in problems}
    assert failing == {"dit_stage1.yaml", "dit_stage2.yaml", "unet_stage1.yaml",
                       "unet_stage2.yaml"}


def test_accelerator_type_must_be_declared(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    rc = cluster_dir / "kuberay" / "raycluster.yaml"
    edit(rc, lambda d: d["spec"]["workerGroupSpecs"][2]["rayStartParams"].update(
        resources='"{\\"train_gpu\\": 8}"'))
    found = fields(validate_cluster(cluster_dir, configs), configs / "train" / "dit_stage1.yaml")
    assert "'accelerator_type:A100-80G' is not offered" in found["scaling.accelerator_type"]


def test_image_drift_and_exposure(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    aws = cluster_dir / "aws.yaml"

    def expose(c: dict) -> None:
        c["docker"]["image"] = "registry.example.com/ttm-ray:0.0.9"
        c["head_start_ray_commands"][1] = c["head_start_ray_commands"][1].replace(
            "127.0.0.1", "0.0.0.0")

    edit(aws, expose)
    edit(cluster_dir / "kuberay" / "raycluster.yaml",
         lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"))
    problems = validate_cluster(cluster_dir, configs)
    found = fields(problems, aws)
    assert "differs from TTM_IMAGE" in found["docker.image"]
    assert "--dashboard-host=0.0.0.0" in found["head_start_ray_commands"]
    rc = fields(problems, cluster_dir / "kuberay" / "raycluster.yaml")
    assert "LoadBalancer exposes" in rc["spec.headGroupSpec.serviceType"]


def test_parse_errors_and_missing_files_are_problems(tree: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    cluster_dir, configs = tree
    (cluster_dir / "gcp.yaml").write_text("cluster_name: [unclosed\n")
    (cluster_dir / "kuberay" / "pvc.yaml").unlink()
    (cluster_dir / "image.env").unlink()
    problems = validate_cluster(cluster_dir, configs)
    by_file = {(Path(p.file).name, p.field) for p in problems}
    assert ("gcp.yaml", "<file>") in by_file
    assert ("kustomization.yaml", "resources[2]") in by_file  # pvc.yaml listed, not there
    assert ("image.env", "<file>") in by_file
    missing = validate_cluster(tmp_path / "nowhere", configs)
    assert missing == [Problem(str(tmp_path / "nowhere"), "<dir>", "directory not found")]


def test_cli_exit_codes(tree: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    cluster_dir, configs = tree
    args = ["validate", "--cluster-dir", str(cluster_dir), "--configs", str(configs)]
    assert cluster_cli.main(args) == 0
    assert capsys.readouterr().out == ""
    aws = cluster_dir / "aws.yaml"
    edit(aws, lambda c: c["available_node_types"]["train_a100"].update(max_workers="four"))
    assert cli.main(["cluster", *args]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"{aws}: available_node_types.train_a100.max_workers: 'four' is not of type " \
           "'integer'" in lines
    assert all(line.count(": ") >= 2 for line in lines)  # FILE: FIELD: MESSAGE


def fake_ray(tmp_path: Path) -> tuple[Path, Path]:
    """A `ray` on PATH that records its arguments and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ray-call.txt"
    ray = bin_dir / "ray"
    ray.write_text(f'#!/usr/bin/env bash\n{{ echo "ARGS $*"; echo "MODE $RAY_AUTH_MODE"; '
                   f'echo "PWD $PWD"; }} > "{record}"\n')
    ray.chmod(ray.stat().st_mode | stat.S_IEXEC)
    return bin_dir, record


def test_cron_submitter(tmp_path: Path) -> None:
    bin_dir, record = fake_ray(tmp_path)
    script = REPO / "cluster" / "cron" / "submit_rebuild.sh"
    env_file = tmp_path / "rebuild.env"
    env_file.write_text(f"RAY_ADDRESS=http://127.0.0.1:8265\nRAY_AUTH_TOKEN_PATH={tmp_path}/t\n"
                        f"TTM_RAY_CHECKOUT={REPO}\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_AUTH_MODE", None)
    run = subprocess.run(["bash", str(script), str(env_file)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = record.read_text()
    assert "ARGS job submit --address http://127.0.0.1:8265 --submission-id rebuild-" in calls
    assert ("--working-dir . --runtime-env jobs/runtime_env.yaml -- python -m "
            "jobs.rebuild_dataset --config jobs/configs/prep/production.yaml") in calls
    assert "MODE token" in calls and f"PWD {REPO}" in calls
    # a token written into the env file is refused, and nothing is submitted
    record.unlink()
    env_file.write_text("RAY_ADDRESS=http://127.0.0.1:8265\nRAY_AUTH_TOKEN=abc\n")
    run = subprocess.run(["bash", str(script), str(env_file)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "not in" in run.stderr and not record.exists()


def test_crontab_line_uses_flock_and_the_script() -> None:
    lines = [line for line in (REPO / "cluster" / "cron" / "crontab.example").read_text()
             .splitlines() if line.strip() and not line.startswith("#") and "=" not in
             line.split()[0]]
    assert len(lines) == 1
    assert "flock -n " in lines[0] and "submit_rebuild.sh /etc/ttm-ray/rebuild.env" in lines[0]


@pytest.mark.slow
def test_runtime_env_keeps_the_upload_small(tmp_path: Path) -> None:
    """Ray's own packaging of the checkout with jobs/runtime_env.yaml's excludes (without the
    help of .gitignore) stays far below the 512 MiB GCS cap and leaves out the venv."""
    from ray._private.runtime_env.packaging import create_package

    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    out = tmp_path / "pkg.zip"
    create_package(str(REPO), out, include_parent_dir=False,
                   excludes=runtime_env["excludes"], include_gitignore=False)
    import zipfile

    names = zipfile.ZipFile(out).namelist()
    assert out.stat().st_size < 20 * 2**20
    assert not any(n.startswith((".venv/", ".git/", "runs/", "mlruns/")) for n in names)
    assert "jobs/train.py" in names or "jobs/build_dataset.py" in names


def test_every_image_install_step_is_pinned() -> None:
    """No pip step of the Dockerfile can escape constraints.txt, and the torch pair it
    installs first is the pair the constraints pin (vLLM's)."""
    docker = REPO / "cluster" / "docker"
    text = (docker / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert len(installs) == 3
    assert all("-c /home/ray/constraints.txt" in line for line in installs)
    pins = dict(line.split("==", 1) for line in (docker / "constraints.txt").read_text()
                .splitlines() if "==" in line and not line.startswith("#"))
    assert f"torch=={pins['torch']}" in installs[0]
    assert f"torchvision=={pins['torchvision']}" in installs[0]
    assert "SAM2_BUILD_CUDA=0" in installs[1] and "--no-build-isolation" in installs[1]
    assert f"sam2=={pins['sam2']}" in installs[1]
    assert '"ttm-ray[gpu]' in installs[2]
    assert "pip wheel --no-deps" in text


def test_rayjob_must_select_a_defined_raycluster(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    job = cluster_dir / "kuberay" / "rayjob-train.yaml"
    edit(job, lambda d: d["spec"]["clusterSelector"].update({"ray.io/cluster": "ttm-rey"}))
    found = fields(validate_cluster(cluster_dir, configs), job)
    assert found == {"spec.clusterSelector.ray.io/cluster":
                     "no RayCluster named 'ttm-rey' here (defined: ttm-ray)"}


def test_without_kubernetes_schemas_problems_not_tracebacks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """If kubernetes-validate is missing the manifests are reported unchecked, loudly."""
    from ttm_ray.ops import cluster_schemas

    monkeypatch.setattr(cluster_schemas, "k8s_schema_dir", lambda: None)
    problems = validate_cluster(REPO / "cluster", REPO / "jobs" / "configs")
    assert Problem("kubernetes-validate", "<package>",
                   "not installed: Kubernetes manifests and pod templates cannot be checked "
                   "(pip install kubernetes-validate)") in problems
    cron = str(REPO / "cluster" / "kuberay" / "cronjob-rebuild.yaml")
    assert any(p.file == cron and p.message.startswith("no schema for CronJob")
               for p in problems)


def test_efa_on_the_training_node_types(tree: tuple[Path, Path]) -> None:
    """A p4de node type without its EFA interfaces, devices, memlock or libfabric env is a
    problem in both the launcher YAML and the RayCluster, named by field."""
    cluster_dir, configs = tree
    aws, rc = cluster_dir / "aws.yaml", cluster_dir / "kuberay" / "raycluster.yaml"

    def strip_launcher(c: dict) -> None:
        train = c["available_node_types"]["train_a100"]
        train["node_config"]["NetworkInterfaces"] = train["node_config"][
            "NetworkInterfaces"][:3]
        del train["node_config"]["NetworkInterfaces"][0]["Groups"]
        train["docker"]["worker_run_options"] = ["--gpus all", "--env FI_PROVIDER=efa"]

    def strip_kuberay(d: dict) -> None:
        container = d["spec"]["workerGroupSpecs"][2]["template"]["spec"]["containers"][0]
        del container["resources"]["limits"]["vpc.amazonaws.com/efa"]
        container["env"] = [e for e in container["env"] if e["name"] != "FI_EFA_FORK_SAFE"]

    edit(aws, strip_launcher)
    edit(rc, strip_kuberay)
    problems = validate_cluster(cluster_dir, configs)
    launcher = [p for p in problems if p.file == str(aws)]
    at = "available_node_types.train_a100"
    messages = {(p.field, p.message) for p in launcher}
    assert (f"{at}.node_config.NetworkInterfaces", "p4de.24xlarge needs 4 EFA interfaces on "
            "NetworkCardIndex 0..3, got cards [0, 1, 2]") in messages
    assert any(f == f"{at}.node_config.NetworkInterfaces[0]" and "SubnetId and Groups" in m
               for f, m in messages)
    runs = " | ".join(m for f, m in messages if f == f"{at}.docker.worker_run_options")
    assert "--device /dev/infiniband" in runs and "memlock" in runs
    assert "FI_EFA_USE_DEVICE_RDMA=1" in runs and "FI_PROVIDER" not in runs
    kuberay = fields(problems, rc)
    where = "spec.workerGroupSpecs[2].template.spec.containers[0]"
    assert "vpc.amazonaws.com/efa" in kuberay[f"{where}.resources.limits"]
    assert f"{where}.resources.requests" not in kuberay
    assert kuberay[f"{where}.env"] == "set FI_EFA_FORK_SAFE=1 (NCCL over EFA)"
    # A node type on a non-EFA instance (the L40S inference group) is not asked for any.
    assert not any("gpu_infer" in p.field for p in problems)


def test_shipped_training_nodes_carry_efa() -> None:
    """The shipped p4de node types declare what the EFA checks look for (so the clean run
    above is not clean because the checks matched nothing)."""
    from ttm_ray.ops.efa_policy import EFA_INTERFACES, launcher_efa

    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    train = aws["available_node_types"]["train_a100"]
    assert EFA_INTERFACES[train["node_config"]["InstanceType"]] == 4
    assert [i["NetworkCardIndex"] for i in train["node_config"]["NetworkInterfaces"]] == [
        0, 1, 2, 3]
    del train["node_config"]["Placement"]
    assert [p.field for p in launcher_efa(aws, "aws.yaml")] == [
        "available_node_types.train_a100.node_config.Placement"]


def _mlflow_service() -> tuple[dict, dict, str]:
    """The shipped MLflow Deployment and Service, and the in-cluster URI of that Service."""
    kuberay = REPO / "cluster" / "kuberay"
    docs = {d["kind"]: d for d in yaml.safe_load_all((kuberay / "mlflow.yaml").read_text())}
    namespace = yaml.safe_load((kuberay / "namespace.yaml").read_text())["metadata"]["name"]
    service = docs["Service"]
    port = service["spec"]["ports"][0]["port"]
    return docs["Deployment"], service, f"http://{service['metadata']['name']}.{namespace}.svc:{port}"


def test_mlflow_service_is_cluster_ip_and_what_every_job_is_told() -> None:
    """KubeRay: the tracking server is applied with the stack, its Service is ClusterIP, and
    every Ray container's MLFLOW_TRACKING_URI names that Service; no runtime env overrides
    it (one would win over the pod's value on this cluster and on the VM clusters)."""
    from mlflow.server.security_utils import is_allowed_host_header

    kuberay = REPO / "cluster" / "kuberay"
    deployment, service, uri = _mlflow_service()
    assert service["spec"]["type"] == "ClusterIP"
    assert uri == "http://ttm-mlflow.ttm-ray.svc:5000"
    assert "mlflow.yaml" in yaml.safe_load((kuberay / "kustomization.yaml").read_text())[
        "resources"]
    raycluster = yaml.safe_load((kuberay / "raycluster.yaml").read_text())["spec"]
    groups = [raycluster["headGroupSpec"], *raycluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == uri, container["name"]
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert "MLFLOW_TRACKING_URI" not in runtime_env.get("env_vars", {})
    for name in ("rayjob-train.yaml", "cronjob-rebuild.yaml"):
        assert "MLFLOW_TRACKING_URI" not in (kuberay / name).read_text(), name
    # The server: the Service selects it, it answers /health, it accepts the Service's name
    # in the Host header (and kubectl port-forward's), not any name; SQLite on its own
    # volume, artifacts on the shared one.
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ttm-ray" and container["command"] == ["mlflow", "server"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if "=" in a)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    allowed = args["allowed-hosts"].split(",")
    host = uri.removeprefix("http://")
    for ok in (host, host.split(".")[0] + ":5000", "localhost:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, ok), ok
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")
    assert "--disable-security-middleware" not in container["args"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args["backend-store-uri"] == f"sqlite:///{mounts['db']}/mlflow.db"
    assert args["artifacts-destination"].startswith(mounts["shared"] + "/")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one writer of the file


def test_mlflow_service_exposed_is_refused(tree: tuple[Path, Path]) -> None:
    cluster_dir, configs = tree
    path = cluster_dir / "kuberay" / "mlflow.yaml"
    index = [d["kind"] for d in yaml.safe_load_all(path.read_text())].index("Service")

    def expose(doc: dict) -> None:
        doc["spec"]["type"] = "LoadBalancer"

    edit(path, expose, index)
    problems = fields(validate_cluster(cluster_dir, configs), Path(f"{path}#{index + 1}"))
    assert "LoadBalancer exposes" in problems["spec.type"], problems


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_head_runs_the_mlflow_server(name: str) -> None:
    """VM clusters: the head starts `mlflow server` with its SQLite file on the head's own
    disk (not the shared NFS), and every node's Ray exports the head's address to jobs."""
    cfg = yaml.safe_load((REPO / "cluster" / name).read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head and "--port 5000" in head
    backend = head.split("--backend-store-uri ")[1].split()[0]
    assert backend.startswith("sqlite:////var/lib/ttm-mlflow/") and "/mnt/shared" not in backend
    assert "--volume /var/lib/ttm-mlflow:/var/lib/ttm-mlflow" in cfg["docker"]["head_run_options"]
    assert "--artifacts-destination /mnt/shared/" in head
    # The old server goes by the process group id it wrote, never by a search by name.
    assert "pkill" not in head and "killall" not in head
    (start_head,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert start_head.index("export MLFLOW_TRACKING_URI=http://") < start_head.index("ray start")
    start_worker = cfg["worker_start_ray_commands"][-1]
    assert "export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000;" in start_worker
