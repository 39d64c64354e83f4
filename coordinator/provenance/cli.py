"""`midgate coordinator job manifest JOB --out FILE`: issue (or fetch) a settled job's signed provenance manifest.

Mounted on `midgate coordinator job` by coordinator/federation/job_cli.py. Imports live inside the command: every
`midgate` invocation imports the CLI modules.
"""

from __future__ import annotations

from pathlib import Path

import typer

ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")
OutOption = typer.Option(..., "--out", "-o", dir_okay=False, help="where to write the signed manifest")
ModelOption = typer.Option(
    None, dir_okay=False, help="the delivered model file; default the run's final-model.npz under jobs_dir"
)


def manifest(
    job_id: str = typer.Argument(..., help="a completed job whose settlement is in the ledger"),
    out: Path = OutOption,
    model: Path | None = ModelOption,
    config: Path | None = ConfigOption,
) -> None:
    """Write the job's provenance manifest (DSSE envelope signed by the MID key: model hash, task spec hash,
    purpose and licence, rounds, members, contribution root, JOB and SETTLEMENT leaves with their inclusion proofs in
    a signed checkpoint). Issued once per job: asking again writes the same manifest. Prints its reference
    (`manifest:<sha256>`), which revenue reports may name the model by."""
    import time

    from coordinator.config import CoordinatorSettings
    from coordinator.ledger.store import LedgerReader
    from coordinator.mid_key import load_or_create_mid_key
    from coordinator.provenance.builder import build_manifest, find_settled_job, model_file_path
    from coordinator.provenance.shelf import ManifestShelf
    from coordinator.provenance.terms import purpose_terms
    from coordinator.tasks.cli import open_catalogue
    from protocol.errors import ProtocolError
    from protocol.provenance import manifest_reference, open_manifest

    settings = CoordinatorSettings.load_for_command(config)
    try:
        mid_key = load_or_create_mid_key(settings.mid_key_file, settings.mid)
        shelf = ManifestShelf(settings.manifests_dir, mid_key.verifier)
        envelope = shelf.get(job_id)
        if envelope is None:
            with LedgerReader.open_existing(settings.ledger_path) as reader:
                job = find_settled_job(reader, job_id).job
                with open_catalogue(settings) as catalogue:
                    spec = catalogue.get(job.task_id, job.task_version).spec
                purpose = purpose_terms(settings, reader, job.purpose, job.started_ms)
                path = model or model_file_path(settings.jobs_dir, job.run_id or 0)
                envelope = build_manifest(
                    reader,
                    job_id,
                    mid=settings.mid,
                    mid_key=mid_key,
                    model_path=path,
                    spec=spec,
                    purpose=purpose,
                    now_ms=time.time_ns() // 1_000_000,
                )
            envelope = shelf.put(job_id, envelope)
        issued = open_manifest(envelope, mid_key.verifier)
    except ProtocolError as error:
        typer.echo(f"manifest refused: {error}", err=True)
        raise typer.Exit(2) from None
    except OSError as error:
        typer.echo(f"manifest refused: {error}", err=True)
        raise typer.Exit(1) from None
    out.write_bytes(envelope)
    typer.echo(f"manifest of job {job_id}: {out}")
    typer.echo(f"reference: {manifest_reference(issued)}")
    typer.echo(f"model: {issued.model.name} sha256 {issued.model.sha256}")
    typer.echo(
        f"settlement: leaf {issued.settlement_leaf.index}; job: leaf {issued.job_leaf.index}; contributions:"
        f" {issued.contributions.count} leaves, root {issued.contributions.root}"
    )
    typer.echo(f"verify offline: midgate buyer verify-model MODEL {out} --mid-key '{mid_key.verifier.text()}'")
