"""Which task a job of the MID trains: the spec the MID signed, verified with its key before any window is cut.

The agent fetches a job's spec from its MID (`GET /v1/tasks/{id}@{version}`, edge.agent.ledger_client) when the
job's first invitation comes, and takes it only with the MID key's signature, parsed strictly (vetted model
families, size and parameter bounds): a buyer's code never runs here, and a spec nobody but the MID signed is
refused. A built-in task (protocol/tasks/specs/) is also known without asking; a MID that cannot be reached (or one
that predates the task catalogue) leaves the device with the built-ins only, and a MID serving a built-in task's
id@version with other contents is refused, since a published spec never changes.
"""

from __future__ import annotations

from collections.abc import Callable

from edge.agent.ledger_client import ProofUnavailableError, RefusedByMidError
from protocol.errors import MalformedError, Reason
from protocol.identity import VerifierKey
from protocol.tasks.signed import open_task_spec
from protocol.tasks.spec import REGISTRY, TaskSpec, UnknownTaskError, get_task

TaskSpecFetch = Callable[[str, int], bytes]
"""(task id, version) -> the MID's signed spec (envelope bytes); blocking. Raises ProofUnavailableError (unreachable)
or RefusedByMidError (the MID refused, e.g. `unknown_task`)."""


def job_task(task_id: str, version: int, mid_key: VerifierKey, fetch: TaskSpecFetch | None) -> TaskSpec:
    """The verified spec of task_id@version. Raises UnknownTaskError (neither the MID nor the built-ins have it) or
    another ProtocolError (the MID's spec is not signed by `mid_key`, tampered, malformed, too large, of another task,
    or a changed built-in). `fetch` None: built-ins only. Blocking: run it in a worker thread."""
    builtin = REGISTRY.get((task_id, version))
    if fetch is None:
        return get_task(task_id, version)
    try:
        envelope = fetch(task_id, version)
    except RefusedByMidError as exc:
        if exc.reason == Reason.UNKNOWN_TASK or builtin is None:
            raise UnknownTaskError("the MID has no such task", task=f"{task_id}@{version}", said=str(exc)) from None
        return builtin
    except ProofUnavailableError as exc:
        if builtin is None:
            raise UnknownTaskError("the MID's task spec could not be fetched", error=str(exc)[:200]) from None
        return builtin
    spec = open_task_spec(envelope, mid_key, task_id=task_id, version=version)
    if builtin is not None and spec != builtin:
        raise MalformedError("the MID's spec of a built-in task differs from the published one", task=spec.key)
    return spec
