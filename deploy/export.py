"""`python deploy/export.py kubernetes|docker-compose FLOW OUTPUT`: `jina export`, then what Jina's templates leave
out for this service (run from the repository root, as `jina export`).

Kubernetes: Jina's gateway Deployment probes with `jina ping gateway` for liveness and has no readiness probe. The
gateway's gRPC health turns NOT_SERVING while an executor is lost (gateway/health.py), so that liveness probe
restarts a healthy gateway whenever an executor is (its predictions and streams with it), and the Service sends
requests to a gateway that is not ready. Here readiness asks `GET /ready` (out of the Service while an executor is
lost or starting, back when it answers) and liveness asks whether the HTTP port accepts connections (a wedged or
dead process), which a restart cures. Deployments restart their containers always (Kubernetes allows no other
policy for them).

docker-compose: Jina's services have no restart policy, so a crashed container stays down. Here every service is
started again unless `docker compose stop` stopped it.

Both: the gateway's default prediction store is a SQLite file in its cache directory (gateway/predictions.py), and
a container's own filesystem starts afresh with the container. The gateway gets a cache directory of its own
(GATEWAY_CACHE: the image's holds the converted model, which the gateway never reads) on a volume that outlives
its container: Kubernetes, an emptyDir of the Pod, which a restarted container finds again (a PersistentVolumeClaim
would not survive the Deployment's rolling update either: the new Pod's gateway waits for the old one's lock on the
file, and the old one stays until the new one is ready); docker-compose, a named volume, which `docker compose
down` keeps too. Predictions that outlive the Pod or the host live in Redis (docs/predictions.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from lifecycle.cache import CACHE_ENV

JINA = Path(sys.executable).parent / "jina"
COMPOSE_RESTART = "unless-stopped"
GATEWAY_CACHE = "/var/lib/token-streaming"
CACHE_VOLUME = "gateway-cache"


def gateway_probes(http_port: int) -> dict:
    return {
        "readinessProbe": {"httpGet": {"path": "/ready", "port": http_port}, "periodSeconds": 2,
                           "failureThreshold": 1, "timeoutSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": http_port}, "initialDelaySeconds": 30, "periodSeconds": 5,
                          "timeoutSeconds": 10},
    }


def patch_kubernetes(output: Path) -> None:
    manifest = output / "gateway" / "gateway.yml"
    docs = list(yaml.safe_load_all(manifest.read_text()))
    for doc in docs:
        if doc and doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            _grpc, http = (port["containerPort"] for port in container["ports"])
            container.update(gateway_probes(http))
            container["env"].append({"name": CACHE_ENV, "value": GATEWAY_CACHE})
            container["volumeMounts"] = [{"name": CACHE_VOLUME, "mountPath": GATEWAY_CACHE}]
            doc["spec"]["template"]["spec"]["volumes"] = [{"name": CACHE_VOLUME, "emptyDir": {}}]
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def patch_compose(output: Path) -> None:
    compose = yaml.safe_load(output.read_text())
    for service in compose["services"].values():
        service["restart"] = COMPOSE_RESTART
    gateway = compose["services"]["gateway"]
    gateway["environment"].append(f"{CACHE_ENV}={GATEWAY_CACHE}")
    gateway["volumes"] = [f"{CACHE_VOLUME}:{GATEWAY_CACHE}"]
    compose["volumes"] = {CACHE_VOLUME: {}}
    output.write_text(yaml.safe_dump(compose, sort_keys=False))


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("kubernetes", "docker-compose"):
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    kind, flow, output = argv
    subprocess.run([str(JINA), "export", kind, flow, output], check=True)
    (patch_kubernetes if kind == "kubernetes" else patch_compose)(Path(output))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
