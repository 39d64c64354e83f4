"""The manifests the MID issued, one per job, in data_dir/manifests/ (0700; files 0600).

A job's manifest is issued once and kept: asking again returns the same bytes, so the reference a buyer reports
revenue under (`manifest:<sha256>`, protocol.provenance.manifest_reference) stays valid. The revenue desk resolves a
reference to its model version here; with few jobs per MID a scan of the folder is cheap (a look-up table is the
scale-out step).
"""

from __future__ import annotations

import os
from pathlib import Path

from protocol.errors import ProtocolError, UnknownModelError
from protocol.identity import VerifierKey
from protocol.private_files import private_dir
from protocol.provenance import Manifest, manifest_reference, open_manifest


class ManifestShelf:
    def __init__(self, folder: Path, mid_key: VerifierKey) -> None:
        self.folder = folder
        self.mid_key = mid_key

    def path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.manifest.json"

    def get(self, job_id: str) -> bytes | None:
        """The job's manifest envelope, if one was issued."""
        path = self.path(job_id)
        return path.read_bytes() if path.exists() else None

    def put(self, job_id: str, envelope: bytes) -> bytes:
        """Keep `envelope` as the job's manifest unless one is kept already; returns the kept one."""
        kept = self.get(job_id)
        if kept is not None:
            return kept
        private_dir(self.folder)
        path = self.path(job_id)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, envelope)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return envelope

    def resolve(self, reference: str) -> Manifest:
        """The issued manifest a `manifest:<sha256>` reference names; UnknownModelError when none does."""
        if self.folder.is_dir():
            for path in sorted(self.folder.glob("*.manifest.json")):
                try:
                    manifest = open_manifest(path.read_bytes(), self.mid_key)
                except (ProtocolError, OSError):
                    continue  # not a manifest of this MID: it names nothing
                if manifest_reference(manifest) == reference:
                    return manifest
        raise UnknownModelError("no manifest the MID issued has this hash", reference=reference)
