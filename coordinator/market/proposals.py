"""Task specs buyers proposed with their job requests (`POST /v1/jobs` with `task_spec`), for the operator:
`midgate coordinator task proposals` lists those awaiting approval, `midgate coordinator task approve JOB` signs the
job's proposed spec into the catalogue (as `task add` does with a file), after which the job is quoted. Blocking."""

from __future__ import annotations

import json
from dataclasses import dataclass

from coordinator.market.models import MarketJob
from coordinator.market.store import MarketStore
from coordinator.tasks.catalogue import SignedTask, TaskCatalogue
from protocol.errors import UnknownJobError
from protocol.tasks.spec import TaskSpec, UnknownTaskError, parse_task_spec


@dataclass(frozen=True)
class Proposal:
    job_id: str
    buyer: str
    spec: TaskSpec


def proposals(store: MarketStore, catalogue: TaskCatalogue) -> list[Proposal]:
    """The proposed tasks of jobs not ended whose task the catalogue does not hold yet."""
    found = []
    for job_id in store.job_ids(states=("requested", "quoted")):
        proposal = _proposal(store, job_id)
        if proposal is None:
            continue
        try:
            catalogue.get(proposal.spec.id, proposal.spec.version)
        except UnknownTaskError:
            found.append(proposal)
    return found


def approve(store: MarketStore, catalogue: TaskCatalogue, job_id: str, now_ms: int) -> SignedTask:
    """Sign the task `job_id` proposed into the catalogue (checked as `task add` checks a file; the same spec again
    returns the entry kept, another spec under its id@version is refused policy_violation)."""
    proposal = _proposal(store, job_id)
    if proposal is None:
        raise UnknownTaskError("this job proposed no task", job=job_id[:80])
    return catalogue.add(proposal.spec, now_ms)


def _proposal(store: MarketStore, job_id: str) -> Proposal | None:
    found = store.job_doc(job_id)
    if found is None:
        raise UnknownJobError("no such job", job=job_id[:80])
    job = MarketJob.model_validate_json(found[1])
    if job.request.task_spec is None:
        return None
    return Proposal(job_id, job.buyer, parse_task_spec(json.dumps(job.request.task_spec).encode()))
