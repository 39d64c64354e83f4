"""Find a report's round capture (coordinator.capture) by its run and round, and judge the report by it.

The gate reads only the round summaries (hashes and drops), never the arrays, and keeps the latest ones in memory:
a summary that exists is complete and never changes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from coordinator.capture.directory import capture_summary_path, read_round_summary
from coordinator.capture.round import RoundCapture
from coordinator.gate.update_check import check_contribution
from protocol.errors import UpdateDroppedError, UpdateMismatchError
from protocol.messages import ContributionBody

log = logging.getLogger("midgate.federation")


class RoundCaptures:
    """Read-through cache of the round summaries under `jobs_dir` (hashes, drops; no arrays).

    Parameters
    ----------
    jobs_dir: the jobs' output folder (`CoordinatorSettings.jobs_dir`).
    max_rounds: captures kept in memory, least recently used dropped first (default 256).
    """

    def __init__(self, jobs_dir: Path, max_rounds: int = 256) -> None:
        self.jobs_dir = jobs_dir
        self.max_rounds = max_rounds
        self._cache: OrderedDict[tuple[int, int], RoundCapture] = OrderedDict()
        self._unreadable: set[tuple[int, int]] = set()

    def get(self, run_id: int, server_round: int) -> RoundCapture | None:
        """The round's capture, or None while the strategy has not written it (or it cannot be read)."""
        key = (run_id, server_round)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        path = capture_summary_path(self.jobs_dir, run_id, server_round)
        if not path.is_file():
            return None
        try:
            capture = read_round_summary(path.read_bytes(), server_round)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if key not in self._unreadable:
                self._unreadable.add(key)
                log.error(
                    "round capture unreadable", extra={"run_id": run_id, "round": server_round, "error": repr(exc)}
                )
            return None
        self._cache[key] = capture
        if len(self._cache) > self.max_rounds:
            self._cache.popitem(last=False)
        return capture


def judge_report(report: ContributionBody, capture: RoundCapture, signer_node_id: int | None) -> None:
    """Raise unless `report` names exactly the update Flower delivered from the signer's own node in this round.

    Parameters
    ----------
    report: the run, round, node and hashes a verified report states.
    capture: the strategy's capture of that run and round.
    signer_node_id: the SuperLink node id registered for the signing device (None: it has none).

    Raises UpdateMismatchError (the report is false: the device is flagged) or UpdateDroppedError (the node's update
    was dropped from the round: honest but no contribution).
    """
    if signer_node_id != report.node_id:
        raise UpdateMismatchError(
            "report names a Flower node that is not the signer's", expected=signer_node_id, found=report.node_id
        )
    for drop in capture.drops:
        if drop.node_id == report.node_id:
            raise UpdateDroppedError(
                "the round dropped this node's update",
                node_id=report.node_id,
                round=report.round,
                drop=str(drop.reason),
            )
    check_contribution(report, capture)


def capture_evidence(capture: RoundCapture | None, node_id: int) -> dict[str, object]:
    """What the capture holds for `node_id`, as kept beside a refused report (None: no capture)."""
    if capture is None:
        return {"captured": False}
    update = next((u for u in capture.updates if u.node_id == node_id), None)
    drop = next((d for d in capture.drops if d.node_id == node_id), None)
    return {
        "captured": True,
        "run_id": str(capture.run_id),
        "round": capture.round,
        "global_sha256": capture.global_sha256,
        "update_sha256": None if update is None else update.update_sha256,
        "gradient_sha256": None if update is None else update.gradient_sha256,
        "drift_offset_sha256": None if update is None else update.drift_offset_sha256,
        "dropped": None if drop is None else str(drop.reason),
        "nodes": sorted(str(u.node_id) for u in capture.updates),
    }
