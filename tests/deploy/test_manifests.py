"""deploy/kubernetes/: every manifest validates offline, strictly (an unknown field is an error,
as with `kubectl apply --validate=strict`), and the pieces fit together (probes, drain timing,
selectors, names the other manifests refer to).

Core kinds: kubernetes-validate's schemas for KUBERNETES_VERSION. KServe and Kubeflow kinds:
their CRDs' OpenAPI schemas, vendored in crd-schemas/ (SOURCES.md), with jsonschema. The
kustomizations are rendered with `kubectl kustomize` (or `kustomize build`) where one is
installed, and the rendered output is validated too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from contract.model_dir import FORMAT_VERSION
from tests.conftest import REPO

DEPLOY = REPO / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).parent / "crd-schemas"
KUBERNETES_VERSION = "1.32"  # oldest release still supported upstream when this was written
CRD_KINDS = {  # apiVersion, kind -> vendored schema
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_ServingRuntime_v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_InferenceService_v1beta1.json",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_PyTorchJob_v1.json",
}
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def load_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resource_files() -> list[Path]:
    """Every manifest a kustomization lists as a resource (patches are checked rendered)."""
    files = []
    for directory in KUSTOMIZATIONS:
        for entry in load_documents(directory / "kustomization.yaml")[0].get("resources", []):
            path = (directory / entry).resolve()
            if path.is_file():
                files.append(path)
    return sorted(set(files))


def strict(schema):
    """A CRD schema as the API server's strict field validation reads it: an object's fields
    are the ones it names, unless it says it keeps unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k not in ("properties", "enum", "required") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@cache
def crd_validator(file: str) -> jsonschema.Draft7Validator:
    schema = strict(json.loads((SCHEMAS / file).read_text()))
    # metadata is the API server's ObjectMeta, not part of the CRD's schema
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def validation_errors(document: dict) -> list[str]:
    """What is wrong with one manifest (empty when it is valid)."""
    key = (document.get("apiVersion"), document.get("kind"))
    if key in CRD_KINDS:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd_validator(CRD_KINDS[key]).iter_errors(document)]
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key} in Kubernetes {KUBERNETES_VERSION} nor vendored"]
    return []


def kustomize_command() -> list[str] | None:
    """kustomize, or kubectl's built-in one when it is kustomize 4 or newer (the `labels`
    field; Debian 12's kubectl 1.20 carries kustomize 2)."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True)
        found = re.search(r"Kustomize Version: v(\d+)", probe.stdout)
        if found and int(found[1]) >= 4:
            return ["kubectl", "kustomize"]
    return None


def by_kind(kind: str, name: str | None = None) -> dict:
    found = [d for f in resource_files() for d in load_documents(f)
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} manifests"
    return found[0]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --- schemas -----------------------------------------------------------------------------

def test_every_manifest_is_listed_by_a_kustomization():
    listed = set(resource_files())
    patches = {(d / p["path"]).resolve() for d in KUSTOMIZATIONS
               for p in load_documents(d / "kustomization.yaml")[0].get("patches", [])}
    for path in DEPLOY.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed | patches, f"{path} is in no kustomization"


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates(path):
    documents = load_documents(path)
    assert documents
    for document in documents:
        assert validation_errors(document) == [], path


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_rendered_kustomization_validates(directory):
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize (kubectl kustomize or kustomize) installed to render overlays")
    proc = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    documents = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert documents
    for document in documents:
        assert validation_errors(document) == [], document["kind"]
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "hff-serve"


@pytest.mark.parametrize("kind, edit, words", [
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        readinesProbe={}), "'readinesProbe' was unexpected"),
    ("Deployment", lambda d: d["spec"].update(replicas="two"), "'two' is not of type"),
    ("HorizontalPodAutoscaler", lambda d: d["spec"].pop("maxReplicas"), "'maxReplicas' is a required"),
    ("InferenceService", lambda d: d["spec"]["predictor"]["model"].update(storageURI="pvc://x"),
     "'storageURI' was unexpected"),
    ("ServingRuntime", lambda d: d["spec"].update(protocolVersions="v2"), "is not of type 'array'"),
    ("PyTorchJob", lambda d: d["spec"].update(nprocsPerNode="1"), "'nprocsPerNode' was unexpected"),
    ("PyTorchJob", lambda d: d["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas="1"),
     "'1' is not of type 'integer'"),
])
def test_a_mistake_is_caught(kind, edit, words):
    """The validation bites: a misspelt field or a wrong type in each schema family fails."""
    document = json.loads(json.dumps(by_kind(kind)))  # a deep copy
    edit(document)
    errors = validation_errors(document)
    assert any(words in e for e in errors), errors


# --- the pieces fit together ---------------------------------------------------------------

def test_serving_pods_probe_readyz_and_healthz_and_outlast_the_drain():
    deployment = by_kind("Deployment", "hff-serve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"] == ["--model-repository", "/models"]
    env = env_of(container)
    assert float(env["HFF_POLL_S"]) > 0
    # preStop sleeps while the endpoints drop the pod, then SIGTERM drains for at most
    # HFF_SHUTDOWN_TIMEOUT_S: the grace period must cover both, or the kubelet's SIGKILL cuts
    # requests the server would have answered.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + float(env["HFF_SHUTDOWN_TIMEOUT_S"])
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert float(env["HFF_THREADS"]) == float(container["resources"]["limits"]["cpu"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == "model-repository"]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert by_kind("PersistentVolumeClaim", claim)


def test_service_hpa_and_pdb_select_the_serving_pods():
    deployment = by_kind("Deployment", "hff-serve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind("Service", "hff-serve")["spec"]["selector"].items() <= labels.items()
    assert by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "hff-serve"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # a node drain may take a pod, and always leaves one serving
    assert 0 < by_kind("PodDisruptionBudget")["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_inference_service_runs_on_the_hff_serving_runtime():
    runtime = by_kind("ServingRuntime")
    service = by_kind("InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"]: f["version"] for f in runtime["spec"]["supportedModelFormats"]}
    assert formats == {model["modelFormat"]["name"]: str(FORMAT_VERSION)}
    assert runtime["spec"]["protocolVersions"] == ["v2"] == [model["protocolVersion"]]
    (container,) = runtime["spec"]["containers"]
    assert container["args"] == ["--model-repository", "/mnt/models"]  # where KServe mounts it
    assert env_of(container)["HFF_PORT"] == str(container["ports"][0]["containerPort"])
    assert model["storageUri"] == "pvc://" + by_kind("PersistentVolumeClaim",
                                                    "hff-model-repository")["metadata"]["name"]


def test_training_jobs_run_torchrun_and_publish_into_the_repository():
    job = by_kind("Job", "hff-train")
    spec = job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    script = container["args"][0]
    workers = int(env_of(container)["WORKERS"])
    assert workers > 1 and spec["completions"] == spec["parallelism"] == workers
    assert spec["completionMode"] == "Indexed"  # JOB_COMPLETION_INDEX is the node rank
    assert "--nnodes \"$WORKERS\"" in script and "-m training" in script
    service = by_kind("Service", spec["template"]["spec"]["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert f"hff-train-0.{service['metadata']['name']}:" in script
    assert "hff-export \"$RUN_DIR\" --repository /models" in script

    pytorch_job = by_kind("PyTorchJob")
    replicas = pytorch_job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for role, spec in replicas.items():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the operator injects its env into this one
        script = container["args"][0]
        assert "torchrun -m training" in script
        assert ("--repository /models" in script) == (role == "Master")  # published once
