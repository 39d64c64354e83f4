"""The MID's device keys as long-running HTTP handlers use them: read from the registry once per registry version.

`coordinator serve` answers members' signed requests and their agents' cosignatures from threads that would
otherwise read and parse every device row per request; the registry's `version` rises with every enrolment and
revocation (also from another process), so a cache keyed on it is never stale for longer than one version read.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from coordinator.registry.store import Device, Registry
from protocol.witness import CosignatureVerifier


@dataclass(frozen=True)
class DeviceKeySnapshot:
    version: int
    by_key_id: dict[str, Device]
    """Every device (revoked ones too, so a revoked key is told apart from an unknown one), by hex key id."""
    witnesses: tuple[CosignatureVerifier, ...]
    """The unrevoked devices' keys in the cosignature/v1 role, by device id."""
    departed: frozenset[str] = frozenset()
    """Devices revoked because their member left: their keys may still read the member's statement."""


class DeviceKeys:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._snapshot = DeviceKeySnapshot(-1, {}, ())

    def current(self) -> DeviceKeySnapshot:
        version = self.registry.version()
        with self._lock:
            if self._snapshot.version != version:
                devices = self.registry.devices()
                self._snapshot = DeviceKeySnapshot(
                    version,
                    {d.verifier.key_id.hex(): d for d in devices},
                    tuple(CosignatureVerifier.for_key(d.verifier) for d in devices if not d.revoked),
                    frozenset(self.registry.departures()),
                )
            return self._snapshot

    def witnesses(self) -> tuple[CosignatureVerifier, ...]:
        return self.current().witnesses
