"""Validates deploy/kubernetes offline, for tests/kubernetes.rs.

Each kustomization is rendered with `kubectl kustomize` (what `kubectl apply -k` would send),
and every object is validated strictly (unknown fields fail): built-in kinds with
kubernetes-validate at one Kubernetes version, custom kinds against their CRD's own
openAPIV3Schema (tests/fixtures/crds), and the configuration files that ConfigMaps carry
against the schemas of the programs that read them (tests/fixtures/schemas). Then the objects
are checked against each other (selectors, ports, metric names between the HPA and the
adapter's rules). What needs a running sluice (probe paths, metric names, flags, memory) is
printed as JSON for the Rust test to check against the real server.

usage: kubernetes_checks.py KUBECTL REPO K8S_VERSION
"""

import copy
import json
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBECTL, REPO, K8S_VERSION = sys.argv[1:4]
DEPLOY = os.path.join(REPO, "deploy", "kubernetes")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
KUSTOMIZATIONS = [DEPLOY, os.path.join(DEPLOY, "multi-node")]
# sluice's metric names in PromQL and in the picker's metric specs.
METRIC = re.compile(r"\b(?:vllm|sluice):[A-Za-z0-9_:]+")

failures = []


def fail(message):
    failures.append(message)


def strict(schema):
    """The CRD schema as the API server's strict field validation applies it."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def crd_schemas():
    """(apiVersion, kind) -> the strict openAPIV3Schema of every served version."""
    schemas = {}
    crds = os.path.join(FIXTURES, "crds")
    for name in sorted(os.listdir(crds)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(crds, name)) as f:
            crd = yaml.safe_load(f)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def load_schema(name):
    with open(os.path.join(FIXTURES, "schemas", name)) as f:
        return json.load(f)


def check_listed(directory):
    """The kustomization lists every manifest beside it, and nothing else."""
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        listed = set(yaml.safe_load(f).get("resources", []))
    present = {
        n
        for n in os.listdir(directory)
        if n.endswith((".yaml", ".yml")) and n != "kustomization.yaml"
    }
    for name in sorted(present - listed):
        fail(f"{directory}/{name} is not in its kustomization.yaml")
    for name in sorted(listed - present):
        fail(f"{directory}/kustomization.yaml lists {name}, which is not there")


def render(directory):
    out = subprocess.run(
        [KUBECTL, "kustomize", directory], capture_output=True, text=True
    )
    if out.returncode != 0:
        fail(f"kubectl kustomize {directory}: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(doc, crds, where):
    key = (doc.get("apiVersion"), doc.get("kind"))
    what = f"{where}: {key[1]} {doc.get('metadata', {}).get('name')}"
    if key in crds:
        errors = sorted(
            jsonschema.Draft202012Validator(crds[key]).iter_errors(doc),
            key=lambda e: list(e.path),
        )
        for e in errors:
            fail(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
        # A CRD's schema leaves `metadata` to the API server: hold it to ObjectMeta's schema,
        # here as a ConfigMap's.
        doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError:
        # Every kind must be checked by some schema: an unknown one is a failure, not a skip.
        fail(f"{what}: no schema (neither built in at {K8S_VERSION} nor a stored CRD)")


def validate_config(text, schema, what):
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        fail(f"{what}: not YAML: {e}")
        return None
    for e in jsonschema.Draft202012Validator(schema).iter_errors(config):
        fail(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
    return config


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cores(value):
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def quantity_bytes(value):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6, "G": 10**9}
    for unit, scale in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * scale)
    return int(value)


def main():
    crds = crd_schemas()
    epp_schema = load_schema("endpointpickerconfig-v1alpha1.schema.json")
    adapter_schema = load_schema("prometheus-adapter-config.schema.json")
    rendered = {}
    for directory in KUSTOMIZATIONS:
        check_listed(directory)
        docs = render(directory)
        for doc in docs:
            validate(doc, crds, os.path.relpath(directory, REPO))
        rendered[directory] = docs

    by_kind = {}
    for doc in rendered[DEPLOY]:
        by_kind.setdefault(doc["kind"], []).append(doc)
    expected = {
        "Deployment", "Service", "PodDisruptionBudget", "PodMonitor",
        "HorizontalPodAutoscaler", "ConfigMap", "InferencePool",
    }
    for kind in sorted(expected - by_kind.keys()):
        fail(f"deploy/kubernetes renders no {kind}")
    if failures:
        return None

    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        fail("the Deployment's selector does not select its own pods")
    (server,) = [c for c in pod["spec"]["containers"] if c["name"] == "sluice"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    metric_uses = []  # (metric name, where it is named)

    for svc in by_kind["Service"]:
        if not selects(svc["spec"]["selector"], pod_labels):
            fail(f"Service {svc['metadata']['name']} selects no sluice pod")
        for p in svc["spec"]["ports"]:
            if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
                fail(f"Service port {p} targets no container port")
    for pdb in by_kind["PodDisruptionBudget"]:
        if not selects(pdb["spec"]["selector"]["matchLabels"], pod_labels):
            fail("the PodDisruptionBudget selects no sluice pod")
    metrics_paths = []
    for pm in by_kind["PodMonitor"]:
        if not selects(pm["spec"]["selector"]["matchLabels"], pod_labels):
            fail("the PodMonitor selects no sluice pod")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep.get("port") not in ports:
                fail(f"the PodMonitor scrapes port {ep.get('port')!r}, not a container port")
            metrics_paths.append(ep.get("path", "/metrics"))
    for pool in by_kind["InferencePool"]:
        if not selects(pool["spec"]["selector"]["matchLabels"], pod_labels):
            fail("the InferencePool selects no sluice pod")
        for p in pool["spec"]["targetPorts"]:
            if p["number"] not in ports.values():
                fail(f"the InferencePool targets port {p['number']}, not a container port")

    # Embedded configuration: the adapter's rules and the endpoint picker's config.
    adapter_names = {}
    adapter_queries = []
    epp_specs = []
    for cm in by_kind["ConfigMap"]:
        for key, text in cm.get("data", {}).items():
            what = f"ConfigMap {cm['metadata']['name']} {key}"
            head = yaml.safe_load(text)
            if isinstance(head, dict) and head.get("kind") == "EndpointPickerConfig":
                config = validate_config(text, epp_schema, what)
                for plugin in (config or {}).get("plugins", []):
                    params = plugin.get("parameters") or {}
                    if plugin["type"] == "metrics-data-source":
                        metrics_paths.append(params.get("path", "/metrics"))
                    for engine in params.get("engineConfigs", []):
                        for field, spec in engine.items():
                            if field.endswith("Spec") and spec:
                                epp_specs.append(spec)
                                for m in METRIC.findall(spec):
                                    metric_uses.append((m, f"{what} {field}"))
                        if engine["name"] == params.get("defaultEngine") and not all(
                            engine.get(f)
                            for f in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec")
                        ):
                            fail(f"{what}: engine {engine['name']} lacks queue, running or KV")
            elif isinstance(head, dict) and "rules" in head:
                config = validate_config(text, adapter_schema, what)
                for rule in (config or {}).get("rules", []):
                    series = METRIC.findall(rule["seriesQuery"])
                    name = rule.get("name", {})
                    if not series or not re.search(name.get("matches", ".*"), series[0]):
                        fail(f"{what}: name.matches {name.get('matches')!r} misses {series}")
                    adapter_names[name.get("as")] = rule
                    adapter_queries.append(rule.get("metricsQuery", ""))
                    for q in ("seriesQuery", "metricsQuery"):
                        for m in METRIC.findall(rule.get(q, "")):
                            metric_uses.append((m, f"{what} {q}"))
    if not epp_specs:
        fail("no EndpointPickerConfig names a metric")

    hpa_metrics = []
    for hpa in by_kind["HorizontalPodAutoscaler"]:
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", deployment["metadata"]["name"]):
            fail(f"the HPA scales {ref}, not the Deployment")
        window = hpa["spec"].get("behavior", {}).get("scaleDown", {})
        if window.get("stabilizationWindowSeconds") != 300:
            fail("the HPA's scale-down stabilisation is not 300 s")
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] != "Pods":
                fail(f"the HPA reads a {metric['type']} metric: expected per-pod ones")
                continue
            name = metric["pods"]["metric"]["name"]
            hpa_metrics.append(name)
            if name not in adapter_names:
                fail(f"the HPA reads {name}, which no adapter rule provides")
    if len(hpa_metrics) < 2:
        fail("the HPA should read the queue and TTFT")

    probes = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = server.get(kind)
        if not probe:
            fail(f"the sluice container has no {kind}")
            continue
        get = probe["httpGet"]
        port = ports.get(get["port"], get["port"])
        probes[kind] = {"path": get["path"], "port": port}

    def env(container):
        return {e["name"]: e.get("value") for e in container.get("env", [])}

    def mounts(container):
        return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}

    inits = pod["spec"].get("initContainers", [])
    init = inits[0] if inits else {}
    if env(init).get("SLUICE_CACHE") != env(server).get("SLUICE_CACHE"):
        fail("the init container fetches into another cache than the server reads")
    shared = set(mounts(init).items()) & set(mounts(server).items())
    if not any(path == env(server).get("SLUICE_CACHE") for _, path in shared):
        fail("the init container and the server share no volume at SLUICE_CACHE")

    resources = server["resources"]
    lifecycle = server.get("lifecycle", {}).get("preStop", {})
    facts = {
        "documents": sum(len(d) for d in rendered.values()),
        "serve_args": server.get("command", [])[1:] + server["args"],
        "container_ports": ports,
        "probes": probes,
        "metrics_paths": metrics_paths,
        "metric_uses": metric_uses,
        "hpa_metrics": hpa_metrics,
        "adapter_queries": adapter_queries,
        "memory_request_bytes": quantity_bytes(resources["requests"]["memory"]),
        "memory_limit_bytes": quantity_bytes(resources["limits"]["memory"]),
        "cpu_request": cores(str(resources["requests"]["cpu"])),
        "termination_grace_seconds": pod["spec"]["terminationGracePeriodSeconds"],
        "prestop_sleep_seconds": lifecycle.get("sleep", {}).get("seconds", 0),
        "init_command": init.get("command", []),
        "multi_node_args": [
            c.get("command", [])[1:] + c.get("args", [])
            for doc in rendered[KUSTOMIZATIONS[1]]
            for template in ("leaderTemplate", "workerTemplate")
            for c in doc["spec"]["leaderWorkerTemplate"][template]["spec"]["containers"]
        ],
    }
    return facts


if __name__ == "__main__":
    facts = main()
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)
    print(json.dumps(facts))
