"""Liveness and readiness for probes: the gRPC health-checking protocol (`grpc.health.v1`).

The server is live while it runs. It is ready when every configured model has a version
AVAILABLE and it is not shutting down; a model is ready when it has a version AVAILABLE.
On the gRPC port, `grpc.health.v1.Health` reports the server's readiness under the service
names of `SERVER_SERVICES` ("" included) and each model's under the model's name; the REST
port reports the same through the Open Inference Protocol's `/v2/health/live`,
`/v2/health/ready` and `/v2/models/{name}[/versions/{v}]/ready`. Neither needs the bearer
token: a probe learns only whether the server or a model it names can answer.
"""

from __future__ import annotations

import threading

from grpc_health.v1 import health, health_pb2

from kvlm.serving.models import ModelManager

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
# gRPC service names whose health is the whole server's readiness ("": the server itself).
SERVER_SERVICES = ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


class Readiness:
    """Whether the server and its models can answer, read from the model manager."""

    def __init__(self, manager: ModelManager):
        self.manager = manager
        self.stopping = threading.Event()

    def model_ready(self, name: str, version: int | None = None) -> bool:
        """Whether model `name` has a version AVAILABLE (version `version` when given).

        Raises:
            ServingError: NOT_FOUND for a model that is not served (INVALID_ARGUMENT for a bad name).
        """
        versions = self.manager.model(name).versions
        return not self.stopping.is_set() and (version in versions if version is not None else bool(versions))

    def models_ready(self) -> dict[str, bool]:
        """`model_ready` of every served model (one snapshot of the manager's models)."""
        stopping = self.stopping.is_set()
        return {name: not stopping and bool(model.versions) for name, model in dict(self.manager.models).items()}

    def server_ready(self) -> bool:
        """Whether every configured model has a version AVAILABLE and the server is not stopping."""
        return not self.stopping.is_set() and all(self.models_ready().values())


class HealthService(health.HealthServicer):
    """`grpc.health.v1.Health` over a `Readiness`: the server under `SERVER_SERVICES`, each model
    under its name (SERVICE_UNKNOWN once it is no longer served, NOT_FOUND if it never was).

    Statuses follow the model manager (`update` runs after each of its refreshes and before each
    check); `enter_graceful_shutdown` turns every one NOT_SERVING for good when the server stops.
    """

    def __init__(self, readiness: Readiness):
        super().__init__()
        self.readiness = readiness
        self._statuses: dict[str, int] = {}
        self._update_lock = threading.Lock()
        self.update()

    def update(self) -> None:
        """Sets each service's status from the manager; watchers hear only of changes."""
        with self._update_lock:
            statuses = dict.fromkeys(SERVER_SERVICES, self.readiness.server_ready())
            statuses |= self.readiness.models_ready()
            wanted = {service: SERVING if ready else NOT_SERVING for service, ready in statuses.items()}
            wanted |= {service: SERVICE_UNKNOWN for service in self._statuses if service not in wanted}
            for service, status in wanted.items():
                if self._statuses.get(service) != status:
                    self.set(service, status)
            self._statuses = wanted

    def Check(self, request, context):
        self.update()
        return super().Check(request, context)

    def Watch(self, request, context, send_response_callback=None):
        self.update()
        return super().Watch(request, context, send_response_callback)
