"""GroupPhases: a Ray Train callback, run inside the Train controller, that tells the RunBoard where
the worker group is before any of our code runs on a worker:

    worker start         the worker actors are being created (Ray Train's get_metadata); no ranks yet
    process-group init   ranks assigned; TorchConfig sets up the process group (rendezvous)
    setup                the process group is up; rank_main runs (model, resume, first collective)

and hands the driver the controller's actor handle, so that Ctrl-C / SIGTERM and a missed deadline
end the run through the controller's own abort. The driver's watchdog (cluster.job) puts a deadline
on the phases Ray Train has none for. Built on ray.train.v2's callback classes (internal API of
Ray 2.5x-2.60: RunConfig(callbacks=[...]) accepts any RayTrainCallback).

On a private single-machine Ray (embedded=True) it also quiets, in the controller, Ray Train's
resource requests to the cluster autoscaler: there is no autoscaler to ask, and on a busy machine
each request that takes over 5 s logs a warning with a full traceback ("Failed to send resource
request ... safe to ignore"). It does so as the callback arrives in the controller process
(__setstate__), before the controller's first request.
"""
from __future__ import annotations

import logging
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback


AUTOSCALING_REQUESTS_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


class GroupPhases(ControllerCallback, WorkerGroupCallback):
    def __init__(self, board, embedded: bool = False):
        self.board, self.embedded = board, embedded

    def __setstate__(self, state: dict[str, Any]) -> None:  # unpickled in the Train controller
        self.__dict__.update(state)
        if self.embedded:  # a filter, not a level: Ray Train's dictConfig resets the levels of ray.train.*
            quiet = logging.getLogger(AUTOSCALING_REQUESTS_LOGGER)
            if _errors_only not in quiet.filters:
                quiet.addFilter(_errors_only)

    def after_controller_start(self, train_run_context) -> None:
        self.board.set_controller.remote(ray.get_runtime_context().current_actor)

    def before_worker_group_start(self, worker_group_context) -> None:
        self.board.group_phase.remote("worker start", [])

    def before_init_train_context(self, workers) -> dict[str, list[Any]]:
        info = [{"rank": w.distributed_context.world_rank, "pid": w.metadata.pid, "node": w.metadata.node_id,
                 "actor": w.actor} for w in workers]
        self.board.group_phase.remote("process-group init", info)
        return {}

    def after_worker_group_start(self, worker_group) -> None:
        self.board.group_phase.remote("setup")

    def before_worker_group_shutdown(self, worker_group) -> None:
        self.board.group_phase.remote("stopped")

    def before_worker_group_abort(self, worker_group_context) -> None:
        self.board.group_phase.remote("stopped")
