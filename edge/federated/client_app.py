"""midgate's Flower ClientApp: local training on the device's windows, and one contribution body per round.

Component reference for the Flower app: `edge.federated.client_app:app`. The run config names the task
(`task-id`, `task-version`) and the local hyper-parameters; the SuperNode's node config names the device's window
file (`data-path`) and the spool directory the agent reads contribution bodies from (`spool-dir`,
edge.federated.spool).

Drift-corrected jobs (run config `drift-correction` > 0, protocol.tasks.drift) send each round a `query.gradient`
message first, answered with the full-batch gradient at the global model, then a train message that carries the
node's drift offset (ArrayRecord `drift-offset`) beside the global model; the contribution body then also names
the hashes of the gradient returned and of the offset received.

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

from edge.federated.acceleration.packed_arrays import packed_arrays_mod
from edge.federated.spool import write_body
from edge.federated.training import LocalTrainingConfig, round_gradient, train_round
from protocol.errors import MalformedError
from protocol.messages import ContributionBody, DpParams
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.drift import DRIFT_OFFSET_KEY, GRADIENT_KEY, QUERY_GRADIENT
from protocol.tasks.models import build_model, evaluate, load_arrays
from protocol.tasks.spec import load_task
from protocol.tasks.windows import load_window_file

ROUND_STATE_KEY = "midgate.round"
GRADIENT_STATE_KEY = "midgate.gradient"  # round -> hash of the gradient this node returned (for the round's record)
CLIPPING_NORM_KEY = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM


def _only_record(records: dict[str, ArrayRecord] | dict[str, MetricRecord] | dict[str, ConfigRecord], kind: str) -> str:
    if len(records) != 1:
        raise MalformedError(f"message must carry exactly one {kind}", found=len(records))
    return next(iter(records))


def _model_record(content: RecordDict) -> str:
    """Key of the global model's ArrayRecord: the only one, besides a drift offset."""
    keys = [k for k in content.array_records if k != DRIFT_OFFSET_KEY]
    if len(keys) != 1:
        raise MalformedError("message must carry exactly one model ArrayRecord", found=len(keys))
    return keys[0]


def _drift_offset(content: RecordDict) -> dict[str, np.ndarray] | None:
    record = content.array_records.get(DRIFT_OFFSET_KEY)
    return None if record is None else _numpy(record)


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _node_path(context: Context, key: str) -> Path:
    value = context.node_config.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedError("node config lacks a path", key=key)
    return Path(value)


def contribution_record_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Writes the round's contribution body to the spool after a successful train reply."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    spool_dir = _node_path(context, "spool-dir")
    global_sha256 = arrays_sha256(_numpy(msg.content.array_records[_model_record(msg.content)]))
    offset = _drift_offset(msg.content)
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
        dp = DpParams(clipping_norm=float(clipping), noise_multiplier=float(noise))  # type: ignore[arg-type]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    gradients = context.state.config_records.get(GRADIENT_STATE_KEY, ConfigRecord())
    gradient_sha256 = gradients.get(str(server_round)) if offset is not None else None
    body = ContributionBody(
        run_id=msg.metadata.run_id,
        round=server_round,
        node_id=context.node_id,
        task_id=str(info["task-id"]),
        task_version=int(info["task-version"]),  # type: ignore[arg-type]
        global_model_sha256=global_sha256,
        update_sha256=arrays_sha256(_numpy(update)),
        examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
        dataset_fingerprint=fingerprint_sha256(str(info["dataset-fingerprint"])),
        loss_before=float(metrics["loss-before"]),  # type: ignore[arg-type]
        loss_after=float(metrics["loss-after"]),  # type: ignore[arg-type]
        seconds=float(metrics["seconds"]),  # type: ignore[arg-type]
        dp=dp,
        gradient_sha256=gradient_sha256 if isinstance(gradient_sha256, str) else None,
        drift_offset_sha256=None if offset is None else arrays_sha256(offset),
    )
    write_body(spool_dir, body)
    return reply


def fingerprint_sha256(fingerprint: str) -> str:
    """The SHA-256 hex a report names for a window file's fingerprint: the file keeps its scheme in front
    (`merkle-sha256:` for the sample store's Merkle root, `sha256:` for a canonical array hash), the report only the
    hex (docs/protocol.md)."""
    return fingerprint.rpartition(":")[2]


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod when the server's DP wrapper sent a clipping norm; a pass-through otherwise."""
    configs = msg.content.config_records
    if msg.metadata.message_type == MessageType.TRAIN and any(CLIPPING_NORM_KEY in c for c in configs.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# packed_arrays_mod outermost: the mods inside it see the named arrays the contribution body hashes.
app = ClientApp(mods=[packed_arrays_mod, contribution_record_mod, dp_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global arrays in `msg`."""
    started = time.perf_counter()
    settings = LocalTrainingConfig.from_run_config(context.run_config)
    spec = load_task(_node_path(context, "data-path").parent, settings.task_id, settings.task_version)
    windows = load_window_file(_node_path(context, "data-path"), spec)
    arrays_key = _model_record(msg.content)
    config = msg.content.config_records[_only_record(msg.content.config_records, "ConfigRecord")]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    offset = _drift_offset(msg.content)
    result = train_round(spec, _numpy(msg.content.array_records[arrays_key]), windows, settings, server_round, offset)
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


@app.query(QUERY_GRADIENT)
def gradient(msg: Message, context: Context) -> Message:
    """Drift correction's query: the full-batch gradient at the global model in `msg`, on the same windows the
    round's training will use; its hash is kept in the node's state for the round's contribution body."""
    settings = LocalTrainingConfig.from_run_config(context.run_config)
    spec = load_task(_node_path(context, "data-path").parent, settings.task_id, settings.task_version)
    windows = load_window_file(_node_path(context, "data-path"), spec)
    config = msg.content.config_records[_only_record(msg.content.config_records, "ConfigRecord")]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    result = round_gradient(
        spec, _numpy(msg.content.array_records[_model_record(msg.content)]), windows, settings, server_round
    )
    # Only this round's hash is kept: the state travels with every message of the run.
    context.state.config_records[GRADIENT_STATE_KEY] = ConfigRecord({str(server_round): arrays_sha256(result.arrays)})
    metrics = MetricRecord({"num-examples": result.examples, "loss": result.loss})
    content = RecordDict(
        {GRADIENT_KEY: ArrayRecord({n: Array(a) for n, a in result.arrays.items()}), "metrics": metrics}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Flower's federated evaluate on the local windows. midgate jobs evaluate centrally on the buyer's validation
    set and never send this message; it exists so Flower's default configuration can be measured against them."""
    settings = LocalTrainingConfig.from_run_config(context.run_config)
    spec = load_task(_node_path(context, "data-path").parent, settings.task_id, settings.task_version)
    windows = load_window_file(_node_path(context, "data-path"), spec)
    model = build_model(spec)
    load_arrays(model, _numpy(msg.content.array_records[_only_record(msg.content.array_records, "ArrayRecord")]))
    metrics: dict[str, int | float | list[int] | list[float]] = dict(evaluate(spec, model, windows.x, windows.y))
    metrics["num-examples"] = len(windows)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
