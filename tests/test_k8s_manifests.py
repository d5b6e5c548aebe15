"""deploy/k8s: schema-valid Kubernetes manifests whose parts agree with each other and the image.

Never applied to a cluster here (none exists on these machines): the schemas come from
kubernetes-validate, which bundles them, and the cross-references are checked with PyYAML.
Every check returns the problems it finds, and the negative tests show each one can fail.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
# Oldest release these manifests are meant for (autoscaling/v2 is GA since 1.23), and the
# newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.29.0", "latest")


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def one(name: str, kind: str) -> dict:
    docs = [doc for doc in load(name) if doc.get("kind") == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}, found {len(docs)}"
    return docs[0]


@pytest.fixture()
def manifests() -> dict:
    """Fresh copies, so a test may mutate them."""
    return {
        "deployment": one("deployment.yaml", "Deployment"),
        "service": one("service.yaml", "Service"),
        "hpa": one("hpa.yaml", "HorizontalPodAutoscaler"),
        "adapter": one("prometheus-adapter-rules.yaml", "ConfigMap"),
    }


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "triton")


def dockerfile_facts() -> dict:
    text = (REPO / "Dockerfile").read_text()
    return {
        "uid": int(re.search(r"useradd\b.*--uid\s+(\d+)", text).group(1)),
        "ports": {int(p) for p in re.search(r"^EXPOSE\s+(.+)$", text, re.M).group(1).split()},
        "model_repository": re.search(r"--model-repository=(\S+?)\"", text).group(1),
    }


def adapter_rules(adapter: dict) -> list[dict]:
    return yaml.safe_load(adapter["data"]["config.yaml"])["rules"]


# --- structure checks: each returns a list of problems ------------------------------------


def check_probes(deployment: dict) -> list[str]:
    problems = []
    c = container(deployment)
    http_ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for probe, path in (
        ("livenessProbe", "/v2/health/live"),
        ("readinessProbe", "/v2/health/ready"),
        ("startupProbe", "/v2/health/live"),
    ):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path:
            problems.append(f"{probe} path is {get.get('path')!r}, not {path}")
        if get.get("port") not in ("http", http_ports.get("http")) or http_ports.get("http") != 8000:
            problems.append(f"{probe} is not on the http port 8000")
    return problems


def check_gpu(deployment: dict) -> list[str]:
    resources = container(deployment).get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    problems = []
    if str(limits.get("nvidia.com/gpu")) != "1":
        problems.append(f"limits nvidia.com/gpu is {limits.get('nvidia.com/gpu')!r}, not 1")
    # Extended resources: a request, when given, must equal the limit.
    if "nvidia.com/gpu" in requests and str(requests["nvidia.com/gpu"]) != str(limits.get("nvidia.com/gpu")):
        problems.append("nvidia.com/gpu request differs from its limit")
    for name in ("cpu", "memory"):
        if name not in requests:
            problems.append(f"no {name} request")
    return problems


def check_ports_and_selectors(deployment: dict, service: dict) -> list[str]:
    problems = []
    template_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    selector = deployment["spec"]["selector"].get("matchLabels", {})
    if not selector or any(template_labels.get(k) != v for k, v in selector.items()):
        problems.append(f"Deployment selector {selector} does not match the pod labels {template_labels}")
    svc_selector = service["spec"].get("selector", {})
    if not svc_selector or any(template_labels.get(k) != v for k, v in svc_selector.items()):
        problems.append(f"Service selector {svc_selector} does not match the pod labels {template_labels}")
    container_ports = {p["name"]: p["containerPort"] for p in container(deployment).get("ports", [])}
    if container_ports != {"http": 8000, "grpc": 8001, "metrics": 8002}:
        problems.append(f"container ports are {container_ports}")
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        number = container_ports.get(target) if isinstance(target, str) else target
        if number is None:
            problems.append(f"Service port {port['name']} targets {target!r}, not a container port")
        elif container_ports.get(port["name"]) != number or port["port"] != number:
            problems.append(f"Service port {port['name']} ({port['port']} -> {target}) does not match the container")
    if {p["name"] for p in service["spec"]["ports"]} != set(container_ports):
        problems.append("the Service does not expose every named container port")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(
        container_ports.get("metrics")
    ):
        problems.append("the pod is not annotated for a Prometheus scrape of the metrics port")
    return problems


def check_server_args(deployment: dict) -> list[str]:
    c = container(deployment)
    args = list(c.get("command", [])) + list(c.get("args", []))
    problems = []
    if "--model-control-mode=none" not in args:
        problems.append("--model-control-mode=none is not in the container's args")
    if any(a.startswith("--model-control-mode=") and a != "--model-control-mode=none" for a in args):
        problems.append("another --model-control-mode is set")
    facts = dockerfile_facts()
    if f"--model-repository={facts['model_repository']}" not in args:
        problems.append(f"the args do not serve {facts['model_repository']}, where the Dockerfile puts the models")
    values = [a.split("=", 1)[1] for a in args if a.startswith("--grpc-port=")]
    if values and values != ["8001"]:
        problems.append(f"--grpc-port is {values}, not 8001")
    # HTTP and metrics must go through the proxy that deploy/serve.sh starts (serving/proxy.py).
    if args[:2] != ["/opt/medoe/serve.sh", "tritonserver"]:
        problems.append(
            f"the container runs {args[:2]}, not /opt/medoe/serve.sh tritonserver (Triton behind the proxy)"
        )
    for flag in ("--http-address", "--http-port", "--metrics-address", "--metrics-port"):
        if any(a.startswith(flag + "=") for a in args):
            problems.append(f"{flag} is set: serve.sh puts Triton's HTTP and metrics on Unix sockets behind the proxy")
    return problems


def check_security(deployment: dict) -> list[str]:
    pod = deployment["spec"]["template"]["spec"].get("securityContext", {})
    ctx = {**pod, **container(deployment).get("securityContext", {})}
    problems = []
    if ctx.get("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    uid = dockerfile_facts()["uid"]
    if ctx.get("runAsUser") != uid:
        problems.append(f"runAsUser is {ctx.get('runAsUser')!r}, not the Dockerfile's uid {uid}")
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    return problems


def check_hpa(hpa: dict, deployment: dict, adapter: dict) -> list[str]:
    problems = []
    target = hpa["spec"]["scaleTargetRef"]
    if (target.get("kind"), target.get("name"), target.get("apiVersion")) != (
        "Deployment",
        deployment["metadata"]["name"],
        "apps/v1",
    ):
        problems.append(f"the HPA targets {target}, not Deployment {deployment['metadata']['name']}")
    if not 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]:
        problems.append("minReplicas/maxReplicas are inconsistent")
    if "replicas" in deployment["spec"]:
        problems.append("the Deployment sets replicas, which every kubectl apply would reset under the HPA")
    pods = [m["pods"] for m in hpa["spec"].get("metrics", []) if m.get("type") == "Pods"]
    defined = {r["name"]["as"]: r for r in adapter_rules(adapter)}
    if len(pods) != 1:
        return problems + [f"expected one Pods metric, found {len(pods)}"]
    name = pods[0]["metric"]["name"]
    rule = defined.get(name)
    if rule is None:
        return problems + [f"HPA metric {name!r} is not defined by the adapter rules ({sorted(defined)})"]
    query = rule["metricsQuery"]
    if not re.search(
        r"rate\(nv_inference_queue_duration_us\{.*\}\[\w+\]\)\)\s*/.*rate\(nv_inference_request_success\{", query, re.S
    ):
        problems.append(f"{name} is not rate(queue duration) / rate(successful requests): {query}")
    series = re.match(r"\s*(\w+)", rule["seriesQuery"]).group(1)
    if series != "nv_inference_queue_duration_us" or not re.search(rule["name"]["matches"], series):
        problems.append(f"the rule's seriesQuery/name.matches do not select nv_inference_queue_duration_us ({series})")
    if rule["resources"].get("overrides", {}).get("pod", {}).get("resource") != "pod":
        problems.append("the rule does not map the pod label to pods, so a Pods metric cannot use it")
    target_value = pods[0]["target"]
    if target_value.get("type") != "AverageValue":
        problems.append("a Pods metric needs an AverageValue target")
    else:
        # Above the dynamic batcher's deliberate wait, or the batcher alone would scale up.
        config = REPO / "model_repository" / "medoe" / "config.pbtxt"
        delay = re.search(r"max_queue_delay_microseconds:\s*(\d+)", config.read_text()) if config.is_file() else None
        if delay and float(target_value["averageValue"]) <= 10 * int(delay.group(1)):
            problems.append(
                f"target {target_value['averageValue']} us is not well above max_queue_delay_microseconds "
                f"{delay.group(1)}"
            )
    return problems


def all_problems(m: dict) -> list[str]:
    d = m["deployment"]
    return (
        check_probes(d)
        + check_gpu(d)
        + check_ports_and_selectors(d, m["service"])
        + check_server_args(d)
        + check_security(d)
        + check_hpa(m["hpa"], d, m["adapter"])
    )


def test_manifests_agree_with_each_other_and_the_image(manifests):
    assert all_problems(manifests) == []


def test_dockerfile_exposes_the_served_ports():
    assert dockerfile_facts()["ports"] == {8000, 8001, 8002}


def test_kustomization_lists_the_server_manifests():
    kustomization = load("kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == {"deployment.yaml", "service.yaml", "hpa.yaml"}
    assert all((K8S / name).is_file() for name in kustomization["resources"])


def _triton(m):
    return container(m["deployment"])


MUTATIONS = {
    "liveness on the ready path": (
        lambda m: _triton(m)["livenessProbe"]["httpGet"].update(path="/v2/health/ready"),
        "livenessProbe path",
    ),
    "readiness on the metrics port": (
        lambda m: _triton(m)["readinessProbe"]["httpGet"].update(port="metrics"),
        "readinessProbe is not on the http port",
    ),
    "no GPU limit": (lambda m: _triton(m)["resources"]["limits"].pop("nvidia.com/gpu"), "limits nvidia.com/gpu"),
    "GPU request != limit": (
        lambda m: _triton(m)["resources"]["requests"].update({"nvidia.com/gpu": 2}),
        "request differs",
    ),
    "Service targets a missing port": (
        lambda m: m["service"]["spec"]["ports"][1].update(targetPort="grpc-web"),
        "not a container port",
    ),
    "Service port renumbered": (
        lambda m: m["service"]["spec"]["ports"][0].update(port=80),
        "does not match the container",
    ),
    "Service selector off": (
        lambda m: m["service"]["spec"]["selector"].update({"app.kubernetes.io/name": "other"}),
        "Service selector",
    ),
    "Deployment selector off": (
        lambda m: m["deployment"]["spec"]["selector"]["matchLabels"].update(tier="x"),
        "Deployment selector",
    ),
    "no scrape annotation": (
        lambda m: m["deployment"]["spec"]["template"]["metadata"]["annotations"].pop("prometheus.io/scrape"),
        "Prometheus scrape",
    ),
    "model control explicit": (
        lambda m: _triton(m).update(args=[a.replace("=none", "=explicit") for a in _triton(m)["args"]]),
        "--model-control-mode=none",
    ),
    "Triton's HTTP on TCP": (lambda m: _triton(m)["args"].append("--http-port=8000"), "--http-port is set"),
    "no proxy": (lambda m: _triton(m).update(args=_triton(m)["args"][1:]), "not /opt/medoe/serve.sh"),
    "root allowed": (
        lambda m: m["deployment"]["spec"]["template"]["spec"]["securityContext"].update(runAsNonRoot=False),
        "runAsNonRoot",
    ),
    "another uid": (
        lambda m: m["deployment"]["spec"]["template"]["spec"]["securityContext"].update(runAsUser=1000),
        "runAsUser",
    ),
    "HPA targets another Deployment": (
        lambda m: m["hpa"]["spec"]["scaleTargetRef"].update(name="other"),
        "the HPA targets",
    ),
    "HPA metric undefined": (
        lambda m: m["hpa"]["spec"]["metrics"][0]["pods"]["metric"].update(name="gpu_util"),
        "not defined by the adapter rules",
    ),
    "Deployment sets replicas": (lambda m: m["deployment"]["spec"].update(replicas=2), "sets replicas"),
    "target below the batcher delay": (
        lambda m: m["hpa"]["spec"]["metrics"][0]["pods"]["target"].update(averageValue="500"),
        "not well above",
    ),
    "rule without the ratio": (
        lambda m: m["adapter"]["data"].update(
            {
                "config.yaml": m["adapter"]["data"]["config.yaml"].replace(
                    "nv_inference_request_success", "nv_inference_exec_count"
                )
            }
        ),
        "is not rate(queue duration) / rate(successful requests)",
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_each_structure_check_rejects_a_broken_manifest(manifests, mutation):
    mutate, expected = MUTATIONS[mutation]
    mutate(manifests)
    problems = all_problems(manifests)
    assert any(expected in p for p in problems), problems


# --- schema validation against the Kubernetes OpenAPI schemas ------------------------------

SCHEMA_FILES = ("deployment.yaml", "service.yaml", "hpa.yaml", "prometheus-adapter-rules.yaml")


def _validator():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate): schema checks skipped",
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_manifest_is_valid_for_the_kubernetes_schema(name, version):
    kv = _validator()
    version = kv.latest_version() if version == "latest" else version
    for doc in load(name):
        # strict: unknown fields (a typo such as `readinesProbe`) are errors, not ignored.
        kv.validate(doc, version, strict=True)


@pytest.mark.parametrize("broken", ["typo", "type"])
def test_schema_validation_rejects_a_broken_deployment(broken):
    kv = _validator()
    deployment = copy.deepcopy(one("deployment.yaml", "Deployment"))
    c = container(deployment)
    if broken == "typo":
        c["readinesProbe"] = c.pop("readinessProbe")
    else:
        c["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)
