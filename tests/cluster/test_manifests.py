"""The deployment files under cluster/ hold up against what reads them.

KubeRay manifests are validated against the CRDs' OpenAPI schemas (unknown keys rejected, unlike the API
server, which would silently prune a typo); the launcher config against Ray's own schema and checks; the
runtime env against Ray's parser; entrypoints against the job's own CLI and config loader; the CronJob's
script against a fake kubectl. No network, no Kubernetes, no Ray cluster.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
IMAGE_WORKDIR = "/app"  # cluster/Dockerfile's WORKDIR: entrypoint paths under it are repository paths
S3_SECRET = "visualprm-s3"
EXAMPLE_DAY = "2026-11-27"
# The CRDs are 56k lines of YAML: libyaml reads them in about a second, the pure-Python loader in 15.
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# ----------------------------------------------------------------------------------------------- loading


def load(name: str) -> Any:
    return yaml.load((CLUSTER / name).read_text(), Loader=FAST_LOADER)


def load_all(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all((CLUSTER / name).read_text(), Loader=FAST_LOADER) if doc]


def cronjob_docs() -> dict[str, dict[str, Any]]:
    docs = load_all("cronjob.yaml")
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind expected in cronjob.yaml"
    return by_kind


def cron_template_text() -> str:
    return cronjob_docs()["ConfigMap"]["data"]["rayjob.yaml"]


def cron_template(day: str = EXAMPLE_DAY) -> dict[str, Any]:
    """The ConfigMap's RayJob template with the day filled in the way run.sh does it."""
    text = cron_template_text().replace("@@NAME@@", f"visualprm-score-{day.replace('-', '')}")
    return yaml.safe_load(text.replace("@@DAY@@", day))


RAYJOB_FILES = ["rayjob.yaml", "raycronjob.yaml", "cronjob.yaml"]


def rayjob_specs() -> dict[str, dict[str, Any]]:
    """Every RayJob spec that can reach the operator: the one-off, the RayCronJob's, the CronJob's."""
    return {
        "rayjob.yaml": load("rayjob.yaml")["spec"],
        "raycronjob.yaml": load("raycronjob.yaml")["spec"]["jobTemplate"],
        "cronjob.yaml": cron_template()["spec"],
    }


def ray_cluster_specs() -> dict[str, dict[str, Any]]:
    specs = {name: spec["rayClusterSpec"] for name, spec in rayjob_specs().items()}
    specs["raycluster.yaml"] = load("raycluster.yaml")["spec"]
    return specs


def groups(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster_spec["headGroupSpec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay treats the first container of a group's pod as the Ray container."""
    return group["template"]["spec"]["containers"][0]


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def package_version() -> str:
    return importlib.metadata.version("visualprm-ray")


# ------------------------------------------------------------------------------------ CRD -> JSON schema

_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SCHEMA_VALUES = ("items", "not", "additionalProperties")


def crd_to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 structural schema (as in a CRD) as a JSON schema that rejects unknown fields.

    ``x-kubernetes-int-or-string`` becomes integer-or-string, other ``x-kubernetes-*`` keys go,
    ``nullable`` admits null, and an object that lists its properties and says nothing about others gets
    ``additionalProperties: false`` (the API server would prune such a field; here a typo is an error).
    Objects without listed properties (``metadata`` at the top, free-form maps) stay open.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in _SCHEMA_MAPS:
            out[key] = {name: crd_to_json_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [crd_to_json_schema(sub) for sub in value]
        elif key in _SCHEMA_VALUES and isinstance(value, dict):
            out[key] = crd_to_json_schema(value)
        else:
            out[key] = copy.deepcopy(value)  # type, enum, default, required, pattern, format ...
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        out.get("properties")
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip("../shared/kuberay-crds not present: KubeRay CRDs are not vendored into the project")
    out = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / filename).read_text(), Loader=FAST_LOADER)
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
        assert version["name"] == "v1", "the manifests say ray.io/v1: it must be the storage version"
        schema = crd_to_json_schema(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        out[kind] = jsonschema.Draft7Validator(schema)
    return out


def schema_errors(validator: jsonschema.Draft7Validator, doc: Any) -> list[str]:
    return sorted(
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(doc)
    )


# --------------------------------------------------------------------------------- CRD validation


@pytest.mark.parametrize(
    ("filename", "kind"),
    [
        ("rayjob.yaml", "RayJob"),
        ("raycluster.yaml", "RayCluster"),
        ("raycronjob.yaml", "RayCronJob"),
        ("rayservice.yaml", "RayService"),
    ],
)
def test_manifest_validates_against_its_crd(validators, filename, kind):
    doc = load(filename)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert schema_errors(validators[kind], doc) == []


def test_cronjob_rayjob_template_validates_against_the_rayjob_crd(validators):
    raw = yaml.safe_load(cron_template_text())  # valid YAML before substitution too
    assert raw["metadata"]["name"] == "@@NAME@@"
    doc = cron_template()
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayJob"
    assert "@@" not in json.dumps(doc)
    assert schema_errors(validators["RayJob"], doc) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        # A misspelled key: the API server would drop it and the cluster would never shut down.
        (
            lambda s: s.__setitem__("shutdownAfterJobFinish", s.pop("shutdownAfterJobFinishes")),
            "'shutdownAfterJobFinish' was unexpected",
        ),
        (
            lambda s: s["rayClusterSpec"]["workerGroupSpecs"][1].__setitem__("replicas", "four"),
            "rayClusterSpec/workerGroupSpecs/1/replicas: 'four' is not of type 'integer'",
        ),
        # rayStartParams values are strings: an unquoted 0 is a type error, not "no CPUs".
        (
            lambda s: s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
            "rayStartParams/num-cpus: 0 is not of type 'string'",
        ),
        # A typo deep inside the pod template is caught too.
        (
            lambda s: ray_container(s["rayClusterSpec"]["headGroupSpec"]).__setitem__(
                "volumeMount", ray_container(s["rayClusterSpec"]["headGroupSpec"]).pop("volumeMounts")
            ),
            "'volumeMount' was unexpected",
        ),
    ],
    ids=["misspelled-key", "replicas-not-int", "unquoted-start-param", "pod-template-typo"],
)
def test_broken_rayjob_fails_validation(validators, mutate, expected):
    doc = load("rayjob.yaml")
    assert schema_errors(validators["RayJob"], doc) == []
    mutate(doc["spec"])
    errors = schema_errors(validators["RayJob"], doc)
    assert any(expected in error for error in errors), errors


def test_names_pass_kuberay_validation():
    """KubeRay rejects names that are not DNS-1035 labels or too long for the Services it derives."""
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    rayjob_names = [
        load("rayjob.yaml")["metadata"]["name"],
        cron_template("2099-12-31")["metadata"]["name"],
        load("raycronjob.yaml")["metadata"]["name"] + "-abcde",  # the RayCronJob appends 5 random characters
    ]
    for name in rayjob_names:
        assert dns1035.fullmatch(name), name
        assert len(name) <= 47, f"{name}: RayJob names are limited to 47 characters"
    cluster_name = load("raycluster.yaml")["metadata"]["name"]
    assert dns1035.fullmatch(cluster_name)
    assert len(cluster_name) <= 53


# ------------------------------------------------------------------------------- Ray cluster shape


@pytest.mark.parametrize("name", [*RAYJOB_FILES, "raycluster.yaml"])
def test_ray_cluster_shape(name):
    spec = ray_cluster_specs()[name]
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head must run no work"

    gpu_groups = []
    for group_name, group in groups(spec):
        container = ray_container(group)
        pod = group["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}

        # /dev/shm: a memory-backed, size-limited emptyDir on every Ray container.
        assert "/dev/shm" in mounts, f"{group_name}: no /dev/shm"
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        assert shm["sizeLimit"]

        # S3 credentials from the Secret only.
        assert {"secretRef": {"name": S3_SECRET}} in container.get("envFrom", []), group_name

        resources = container["resources"]
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if gpus:
            gpu_groups.append(group_name)
            assert gpus == 1, "one GPU per pod: one scoring actor per GPU"
            assert resources["requests"] == resources["limits"], f"{group_name}: GPU requests != limits"

        if group_name != "head":
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert env.get("VISUALPRM_CACHE") == "/cache", group_name
            assert "/cache" in mounts, f"{group_name}: the model cache is not mounted"
            assert "hostPath" in volumes[mounts["/cache"]] or "emptyDir" in volumes[mounts["/cache"]]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    assert any(
        "nvidia.com/gpu" not in ray_container(g)["resources"].get("limits", {})
        for n, g in groups(spec)
        if n != "head"
    ), "no CPU worker group for image preparation"


def test_the_rayservice_deploys_the_endpoint_the_cli_serves(monkeypatch):
    """serveConfigV2 is a valid Serve config whose application is this package's builder, with
    arguments that make a valid server config; the cluster is the job's GPU pods, the token from
    a Secret on every pod, the head running no replicas."""
    from ray.serve.schema import ServeDeploySchema

    from visualprm_ray.serve import app

    doc = load("rayservice.yaml")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert serve_config.http_options.host == "0.0.0.0" and serve_config.http_options.port == 8000
    (application,) = serve_config.applications
    module, _, name = application.import_path.partition(":")
    assert module == app.__name__ and callable(getattr(app, name))
    monkeypatch.setenv("VISUALPRM_SERVE_TOKEN", "t")
    built = app.app_builder(application.args)  # device and replicas are set: no cluster is asked
    assert type(built).__name__ == "Application"
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    expected_image = f"ghcr.io/your-org/visualprm-ray:{package_version()}"
    replicas = {s.split("=", 1)[0]: s.split("=", 1)[1] for s in application.args["set"]}
    gpu_pods = 0
    for group_name, group in groups(cluster):
        pod = group["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["image"] == expected_image
        container = ray_container(group)
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
        assert secrets == [S3_SECRET, "visualprm-serve-token"], group_name
        if group_name != "head":
            assert ray_container(group)["resources"]["limits"]["nvidia.com/gpu"] == 1
            gpu_pods += group["replicas"]
    assert int(replicas["server.replicas"]) == gpu_pods, "one replica per GPU pod"


def test_every_container_runs_the_project_image():
    expected = f"ghcr.io/your-org/visualprm-ray:{package_version()}"
    seen = set()
    for name, spec in ray_cluster_specs().items():
        for _, group in groups(spec):
            pod = group["template"]["spec"]
            for container in pod["containers"] + pod.get("initContainers", []):
                seen.add(container["image"])
                assert container["image"] == expected, name
    assert seen == {expected}


@pytest.mark.parametrize("name", ["raycronjob.yaml", "cronjob.yaml"])
def test_scheduled_runs_use_the_cluster_of_rayjob_yaml(name):
    """The three copies of the cluster (one-off, RayCronJob, CronJob template) must not drift apart."""
    specs = rayjob_specs()
    assert specs[name]["rayClusterSpec"] == specs["rayjob.yaml"]["rayClusterSpec"]


def test_interactive_cluster_autoscales_with_the_same_pods():
    cluster = load("raycluster.yaml")["spec"]
    batch = load("rayjob.yaml")["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"] == batch["headGroupSpec"]
    batch_groups = {g["groupName"]: g for g in batch["workerGroupSpecs"]}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] < group["maxReplicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"] == batch_groups[group["groupName"]]["template"]
    (gpu,) = [
        g for g in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in ray_container(g)["resources"]["limits"]
    ]
    assert gpu["minReplicas"] >= 1, "the job fails at start on a cluster without GPUs (runtime.device: cuda)"


# --------------------------------------------------------------------------------------- RayJob runs


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_rayjob_lifecycle(name):
    spec = rayjob_specs()[name]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1
    assert "runtimeEnvYAML" not in spec, "the image holds the package"


def entrypoint_invocation(entrypoint: str) -> tuple[Path, list[str]]:
    """The script (as a repository path) and its arguments; a `$(date ...)` stands for a day."""
    assert not re.search(r"[;|&`]", entrypoint), "KubeRay pastes the entrypoint into a bash script"
    text = re.sub(r"\$\(date [^)]*\)", EXAMPLE_DAY, entrypoint)
    assert "$" not in text
    python, script, *args = shlex.split(text)
    assert python == "python"
    return in_image(script), args


def in_image(path: str) -> Path:
    assert path.startswith(IMAGE_WORKDIR + "/"), f"{path}: not an absolute path under the image's WORKDIR"
    return ROOT / path.removeprefix(IMAGE_WORKDIR + "/")


@pytest.mark.parametrize("name", RAYJOB_FILES)
def test_entrypoint_is_a_valid_job_invocation(name):
    from visualprm_ray.cli import build_parser
    from visualprm_ray.job.config import JobConfig

    script, args = entrypoint_invocation(rayjob_specs()[name]["entrypoint"])
    assert script == ROOT / "jobs" / "score_rollouts.py"
    assert script.is_file()
    parsed = build_parser().parse_args(["score", *args])
    config_path = in_image(parsed.config)
    assert config_path == ROOT / "jobs" / "configs" / "cluster.yaml"
    assert config_path.is_file()
    config = JobConfig.from_sources(
        config_path, parsed.set, input_uri=parsed.input, output_uri=parsed.output, model_source=parsed.model
    )
    # backoffLimit is only safe because a rerun resumes.
    assert config.output.mode == "resume"
    assert config.runtime.device == "cuda"
    if name != "rayjob.yaml":
        assert EXAMPLE_DAY in config.input.uri
        assert EXAMPLE_DAY in config.output.uri, "a scheduled run writes a dated output"


def daily_hour(schedule: str) -> int:
    minute, hour, *rest = schedule.split()
    assert rest == ["*", "*", "*"], f"{schedule}: not a daily schedule"
    assert minute.isdigit()
    return int(hour)


def test_raycronjob_runs_end_before_the_next_day():
    doc = load("raycronjob.yaml")["spec"]
    assert doc["timeZone"] in ("UTC", "Etc/UTC")
    job = doc["jobTemplate"]
    worst_case = (job["backoffLimit"] + 1) * job["activeDeadlineSeconds"]
    # No concurrencyPolicy in RayCronJob, and each retry re-expands $(date ...): every attempt must end
    # on the day it started, before the next tick.
    assert daily_hour(doc["schedule"]) * 3600 + worst_case < 24 * 3600


def test_cronjob_schedule_waits_and_deadlines_fit_a_day():
    docs = cronjob_docs()
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    daily_hour(cron["schedule"])
    job = cron["jobTemplate"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    rayjob = cron_template()["spec"]
    worst_case = (rayjob["backoffLimit"] + 1) * rayjob["activeDeadlineSeconds"]
    assert int(env["WAIT_TIMEOUT_S"]) >= worst_case
    assert job["activeDeadlineSeconds"] > int(env["WAIT_TIMEOUT_S"])
    assert job["activeDeadlineSeconds"] < 24 * 3600
    assert container["command"] == ["sh", "/etc/visualprm-score/run.sh"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in job["template"]["spec"]["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert mount[config_volume] == "/etc/visualprm-score"


def test_cronjob_rbac_allows_what_the_script_does():
    docs = cronjob_docs()
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert docs["ServiceAccount"]["metadata"]["name"] == account
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": docs["Role"]["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]

    def verbs(group: str, resource: str) -> set[str]:
        return {
            verb
            for rule in docs["Role"]["rules"]
            if group in rule["apiGroups"] and resource in rule["resources"]
            for verb in rule["verbs"]
        }

    assert {"create", "get", "list", "watch", "delete"} <= verbs("ray.io", "rayjobs")
    assert "get" in verbs("", "pods/log")
    assert {"get", "list"} <= verbs("", "pods")
    assert "get" in verbs("batch", "jobs")
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in docs["Role"]["rules"])


# ------------------------------------------------------------------------ the CronJob's script, for real

# A kubectl that plays a RayJob's life from files in $FAKE: `exists`, `statuses` (one per `get -o jsonpath`,
# the last one sticks), `after_create` (the statuses after a create), and it records `calls` and `created`.
FAKE_KUBECTL = textwrap.dedent(
    """\
    #!/bin/sh
    echo "$*" >> "$FAKE/calls"
    case "$1" in
      get)
        if [ ! -f "$FAKE/exists" ]; then
          echo 'Error from server (NotFound): rayjobs.ray.io "x" not found' >&2
          exit 1
        fi
        case "$*" in
          *"-o name"*) echo "rayjob.ray.io/$3" ;;
          *)
            head -n 1 "$FAKE/statuses" | tr -d '\n'
            if [ "$(wc -l < "$FAKE/statuses")" -gt 1 ]; then
              tail -n +2 "$FAKE/statuses" > "$FAKE/rest" && mv "$FAKE/rest" "$FAKE/statuses"
            fi ;;
        esac ;;
      create) cat >> "$FAKE/created"; touch "$FAKE/exists"; cp "$FAKE/after_create" "$FAKE/statuses" ;;
      delete) rm -f "$FAKE/exists" ;;
      wait) exit 1 ;;
      logs) echo "the driver's log" ;;
    esac
    """
)


def run_script(tmp_path: Path, *, exists: bool, statuses=("/",), after_create=("/",), env=None):
    """Run the ConfigMap's run.sh with the fake kubectl; return the process and what kubectl saw."""
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    kubectl = fake / "bin" / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    (fake / "statuses").write_text("".join(f"{s}\n" for s in statuses))
    (fake / "after_create").write_text("".join(f"{s}\n" for s in after_create))
    (fake / "calls").write_text("")
    if exists:
        (fake / "exists").touch()
    template = tmp_path / "rayjob.yaml"
    template.write_text(cron_template_text())
    script = tmp_path / "run.sh"
    script.write_text(cronjob_docs()["ConfigMap"]["data"]["run.sh"])
    full_env = {
        "PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "FAKE": str(fake),
        "TEMPLATE": str(template),
        "POLL_S": "0",
        "WAIT_TIMEOUT_S": "5",
        "DAY": EXAMPLE_DAY,
        **(env or {}),
    }
    proc = subprocess.run(["sh", str(script)], env=full_env, capture_output=True, text=True, timeout=60)
    created = fake / "created"
    state = {
        "calls": (fake / "calls").read_text().splitlines(),
        "created": created.read_text() if created.exists() else None,
    }
    return proc, state


def commands(state) -> list[str]:
    return [call.split()[0] for call in state["calls"]]


def test_script_creates_the_days_rayjob_and_waits_for_success(tmp_path):
    proc, state = run_script(
        tmp_path,
        exists=False,
        after_create=["/", "Initializing/PENDING", "Running/RUNNING", "Complete/SUCCEEDED"],
    )
    assert proc.returncode == 0, proc.stderr
    assert commands(state).count("create") == 1
    assert "wait" in commands(state)
    created = state["created"]
    assert created == cron_template_text().replace("@@NAME@@", "visualprm-score-20261127").replace(
        "@@DAY@@", EXAMPLE_DAY
    )
    assert yaml.safe_load(created) == cron_template()


def test_script_waits_for_an_existing_rayjob_instead_of_creating_one(tmp_path):
    proc, state = run_script(
        tmp_path, exists=True, statuses=["Running/RUNNING", "Running/RUNNING", "Complete/SUCCEEDED"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "create" not in commands(state)
    assert "delete" not in commands(state)


def test_script_is_a_no_op_for_a_finished_day(tmp_path):
    proc, state = run_script(tmp_path, exists=True, statuses=["Complete/SUCCEEDED"])
    assert proc.returncode == 0, proc.stderr
    assert set(commands(state)) == {"get"}


def test_script_fails_when_the_rayjob_fails(tmp_path):
    proc, state = run_script(tmp_path, exists=False, after_create=["/", "Running/RUNNING", "Failed/FAILED"])
    assert proc.returncode == 1
    assert "Failed/FAILED" in proc.stderr
    assert "logs" in commands(state)


def test_script_reruns_a_failed_day(tmp_path):
    proc, state = run_script(
        tmp_path, exists=True, statuses=["Failed/FAILED"], after_create=["/", "Complete/SUCCEEDED"]
    )
    assert proc.returncode == 0, proc.stderr
    assert commands(state).index("delete") < commands(state).index("create")


def test_script_gives_up_after_its_timeout(tmp_path):
    proc, _ = run_script(tmp_path, exists=True, statuses=["Running/RUNNING"], env={"WAIT_TIMEOUT_S": "0"})
    assert proc.returncode == 1
    assert "gave up" in proc.stderr


def test_script_rejects_a_malformed_day(tmp_path):
    proc, state = run_script(tmp_path, exists=False, env={"DAY": "2026-11-27/ --set output.mode=overwrite"})
    assert proc.returncode == 2
    assert state["calls"] == []


def test_script_defaults_to_yesterday_utc(tmp_path):
    before = datetime.now(timezone.utc)
    proc, state = run_script(tmp_path, exists=False, after_create=["Complete/SUCCEEDED"], env={"DAY": ""})
    after = datetime.now(timezone.utc)
    assert proc.returncode == 0, proc.stderr
    names = {f"visualprm-score-{(t - timedelta(days=1)):%Y%m%d}" for t in (before, after)}
    assert yaml.safe_load(state["created"])["metadata"]["name"] in names


# ------------------------------------------------------------------------------------------- secrets

KUBERNETES_FILES = ["rayjob.yaml", "raycluster.yaml", "raycronjob.yaml", "cronjob.yaml"]


def test_no_credentials_in_any_cluster_file():
    for path in sorted(CLUSTER.iterdir()):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path.name}: an AWS access key id"
        assert not re.search(r"AWS_SECRET_ACCESS_KEY\W{1,3}[A-Za-z0-9/+]{40}", text), f"{path.name}: a secret"
        assert not re.search(r"-e\s+AWS_", text), f"{path.name}: AWS credentials passed to docker"


@pytest.mark.parametrize("filename", KUBERNETES_FILES)
def test_aws_variables_come_from_secrets_only(filename):
    docs = load_all(filename)
    if filename == "cronjob.yaml":
        docs.append(cron_template())
    for node in (n for doc in docs for n in walk(doc) if isinstance(n, dict)):
        for item in node.get("env", []) or []:
            if item["name"].startswith("AWS_"):
                assert "value" not in item, f"{filename}: literal {item['name']}"
                assert "secretKeyRef" in item["valueFrom"], f"{filename}: {item['name']} not from a Secret"
        for source in node.get("envFrom", []) or []:
            assert set(source) == {"secretRef"}, f"{filename}: envFrom other than a Secret: {source}"


# -------------------------------------------------------------------------------------- cluster launcher


def launcher_schema() -> dict[str, Any]:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_launcher_config_validates_against_rays_schema():
    config = load("cluster-aws.yaml")
    schema = launcher_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    assert list(jsonschema.Draft7Validator(schema).iter_errors(config)) == []

    # What `ray up` does before it talks to AWS: merge the provider defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.__setitem__("max_worker", 8),  # unknown top-level key
        lambda c: c["available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", "1"),
        lambda c: c["docker"].__setitem__("run_option", []),
    ],
    ids=["unknown-top-level-key", "resource-not-int", "unknown-docker-key"],
)
def test_broken_launcher_config_fails(mutate):
    config = load("cluster-aws.yaml")
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, launcher_schema(), cls=jsonschema.Draft7Validator)


def test_launcher_config_semantics():
    config = load("cluster-aws.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in node_types.values())
    assert any(t["resources"].get("CPU", 0) > 0 and "GPU" not in t["resources"] for t in node_types.values())
    setup = " ".join(config["setup_commands"])
    assert f'"ray[data]=={ray.__version__}"' in setup
    assert "visualprm-ray" in setup
    assert "-v /mnt/visualprm-cache:/cache" in config["docker"]["run_options"]
    assert "-e VISUALPRM_CACHE=/cache" in config["docker"]["run_options"]


# --------------------------------------------------------------------------------------- runtime env


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    # Unknown keys are not errors for RuntimeEnv (they are taken as plugin names): check them here.
    assert set(data) <= RuntimeEnv.known_fields, set(data) - RuntimeEnv.known_fields
    env = RuntimeEnv(**data)
    assert env.working_dir() == "."
    assert env.env_vars() == {"PYTHONUNBUFFERED": "1"}
    with pytest.raises(TypeError):  # the constructor does validate: a non-string env value is refused
        RuntimeEnv(**{**data, "env_vars": {"PYTHONUNBUFFERED": 1}})


def packed_files(root: Path) -> set[str]:
    """The files Ray would pack from working_dir ``root`` with our excludes (.gitignore not consulted)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]
    files: list[Path] = []
    _dir_travel(
        root,
        [_get_excludes(root, excludes)],
        lambda p: files.append(p) if p.is_file() else None,
        include_gitignore=False,
    )
    return {p.relative_to(root).as_posix() for p in files}


CODE = ["pyproject.toml", "visualprm_ray/cli.py", "jobs/score_rollouts.py", "jobs/configs/cluster.yaml"]
BULK = [
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".git/objects/pack/pack-1.pack",
    "tests/test_cli.py",
    "visualprm-demo/rollouts/part-0.parquet",
    "docs/gpu-runs/h200.json",
    "data/rollouts.parquet",
    "checkpoints/model-00001-of-00004.safetensors",
    "visualprm_ray/__pycache__/cli.cpython-311.pyc",
    "visualprm_ray.egg-info/PKG-INFO",
]


def test_runtime_env_excludes_bulk_and_keeps_code(tmp_path):
    for rel in CODE + BULK:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert packed_files(tmp_path) == set(CODE)


def test_runtime_env_upload_of_this_checkout_is_small():
    names = packed_files(ROOT)
    assert set(CODE) <= names
    assert sum((ROOT / name).stat().st_size for name in names) < 50 * 2**20


# ---------------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_base_image_is_the_tested_ray():
    (base,) = [rest for instruction, rest in dockerfile_instructions() if instruction == "FROM"]
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    (run_pip,) = [rest for instruction, rest in dockerfile_instructions() if "pip install" in rest]
    assert f'"ray[data,serve]=={ray.__version__}"' in run_pip
    assert "[dev]" not in run_pip


def test_dockerfile_copies_code_only():
    instructions = dockerfile_instructions()
    assert ("WORKDIR", IMAGE_WORKDIR) in instructions
    assert any(i == "ENV" and "VISUALPRM_CACHE=/cache" in rest for i, rest in instructions)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    sources = []
    for instruction, rest in instructions:
        assert instruction != "ADD", "ADD can fetch URLs and unpack archives: use COPY"
        if instruction == "COPY":
            *srcs, _dest = [arg for arg in rest.split() if not arg.startswith("--")]
            sources += srcs
    assert sources
    for src in sources:
        assert src not in (".", "./", "*"), "copying the whole context could bake in weights or demo data"
        assert not re.search(r"safetensors|\.bin$|\.pt$|model|weight|cache|demo", src, re.I), src
        assert (ROOT / src).exists(), src
        assert f"!{src}" in ignore, f"{src} is excluded from the build context"
    # The entrypoints' paths exist in the image.
    for spec in rayjob_specs().values():
        script, args = entrypoint_invocation(spec["entrypoint"])
        for path in [script, in_image(args[args.index("--config") + 1])]:
            rel = path.relative_to(ROOT).as_posix()
            assert any(rel == s.rstrip("/") or rel.startswith(s.rstrip("/") + "/") for s in sources), rel


# -------------------------------------------------------------------------------------------- README


def test_readme_describes_every_file():
    readme = (CLUSTER / "README.md").read_text()
    for path in sorted(CLUSTER.iterdir()):
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, f"cluster/README.md does not mention {path.name}"
