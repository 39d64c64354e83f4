"""midgate's Flower ClientApp: local training on the device's windows, and one contribution record per round.

Component reference for the Flower app: `edge.federated.client_app:app`. The run config names the task
(`task-id`, `task-version`) and the local hyper-parameters; the SuperNode's node config names the device's window
file (`data-path`) and the spool directory the agent reads records from (`spool-dir`).

Mod order matters: `contribution_record_mod` is outermost so that it hashes the update exactly as Flower sends it,
after `dp_clipping_mod` (Flower's fixedclipping_mod) has clipped it; the coordinator recomputes the same hash from
the update it receives.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from edge.federated.spool import write_record
from edge.federated.training import LocalTrainingConfig, train_round
from protocol.errors import MalformedError
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.contribution import ContributionRecord, DPParams
from protocol.tasks.models import build_model, evaluate, load_arrays
from protocol.tasks.spec import get_task
from protocol.tasks.windows import load_window_file

ROUND_STATE_KEY = "midgate.round"
CLIPPING_NORM_KEY = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM


def _only_record(records: dict[str, ArrayRecord] | dict[str, MetricRecord] | dict[str, ConfigRecord], kind: str) -> str:
    if len(records) != 1:
        raise MalformedError(f"message must carry exactly one {kind}", found=len(records))
    return next(iter(records))


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _node_path(context: Context, key: str) -> Path:
    value = context.node_config.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedError("node config lacks a path", key=key)
    return Path(value)


def contribution_record_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Writes the round's contribution record to the spool after a successful train reply."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    spool_dir = _node_path(context, "spool-dir")
    received = msg.content.array_records[_only_record(msg.content.array_records, "ArrayRecord")]
    global_sha256 = arrays_sha256(_numpy(received))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    update = reply.content.array_records[_only_record(reply.content.array_records, "ArrayRecord")]
    metrics = reply.content.metric_records[_only_record(reply.content.metric_records, "MetricRecord")]
    info = context.state.config_records[ROUND_STATE_KEY]
    config = msg.content.config_records[_only_record(msg.content.config_records, "ConfigRecord")]
    clipping = config.get(CLIPPING_NORM_KEY)
    dp = None
    if isinstance(clipping, (int, float)) and not isinstance(clipping, bool):
        noise = context.run_config.get("dp-noise-multiplier", 0.0)
        dp = DPParams(clipping_norm=float(clipping), noise_multiplier=float(noise))  # type: ignore[arg-type]
    record = ContributionRecord(
        run_id=msg.metadata.run_id,
        round=int(config["server-round"]),  # type: ignore[arg-type]
        node_id=context.node_id,
        task_id=str(info["task-id"]),
        task_version=int(info["task-version"]),  # type: ignore[arg-type]
        global_model_sha256=global_sha256,
        update_sha256=arrays_sha256(_numpy(update)),
        examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
        dataset_fingerprint=str(info["dataset-fingerprint"]),
        loss_before=float(metrics["loss-before"]),  # type: ignore[arg-type]
        loss_after=float(metrics["loss-after"]),  # type: ignore[arg-type]
        seconds=float(metrics["seconds"]),  # type: ignore[arg-type]
        dp=dp,
        created_ms=time.time_ns() // 1_000_000,
    )
    write_record(spool_dir, record)
    return reply


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod when the server's DP wrapper sent a clipping norm; a pass-through otherwise."""
    configs = msg.content.config_records
    if msg.metadata.message_type == MessageType.TRAIN and any(CLIPPING_NORM_KEY in c for c in configs.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[contribution_record_mod, dp_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global arrays in `msg`."""
    started = time.perf_counter()
    settings = LocalTrainingConfig.from_run_config(context.run_config)
    spec = get_task(settings.task_id, settings.task_version)
    windows = load_window_file(_node_path(context, "data-path"), spec)
    arrays_key = _only_record(msg.content.array_records, "ArrayRecord")
    config = msg.content.config_records[_only_record(msg.content.config_records, "ConfigRecord")]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    result = train_round(spec, _numpy(msg.content.array_records[arrays_key]), windows, settings, server_round)
    context.state.config_records[ROUND_STATE_KEY] = ConfigRecord(
        {"task-id": spec.id, "task-version": spec.version, "dataset-fingerprint": windows.fingerprint}
    )
    metrics = MetricRecord(
        {
            "num-examples": result.examples,
            "loss-before": result.loss_before,
            "loss-after": result.loss_after,
            "seconds": time.perf_counter() - started,
        }
    )
    update = ArrayRecord({name: Array(value) for name, value in result.arrays.items()})
    return Message(content=RecordDict({arrays_key: update, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Flower's federated evaluate on the local windows. midgate jobs evaluate centrally on the buyer's validation
    set and never send this message; it exists so Flower's default configuration can be measured against them."""
    settings = LocalTrainingConfig.from_run_config(context.run_config)
    spec = get_task(settings.task_id, settings.task_version)
    windows = load_window_file(_node_path(context, "data-path"), spec)
    model = build_model(spec)
    load_arrays(model, _numpy(msg.content.array_records[_only_record(msg.content.array_records, "ArrayRecord")]))
    metrics: dict[str, int | float | list[int] | list[float]] = dict(evaluate(spec, model, windows.x, windows.y))
    metrics["num-examples"] = len(windows)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
