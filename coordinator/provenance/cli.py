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
    from coordinator.config import CoordinatorSettings
    from coordinator.mid_key import load_or_create_mid_key
    from coordinator.provenance.issue import issue_manifest
    from protocol.errors import ProtocolError
    from protocol.provenance import manifest_reference, open_manifest

    settings = CoordinatorSettings.load_for_command(config)
    try:
        envelope = issue_manifest(settings, job_id, model)
        mid_key = load_or_create_mid_key(settings.mid_key_file, settings.mid)
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
