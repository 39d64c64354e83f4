"""The ServerApp of `fl_bench.py rounds`' flower-default configuration: midgate's job (server_app.run_job) on FedAvg
as Flower ships it, which besides midgate's central evaluation sends the federated evaluate message to every node of
the round each round (fraction_evaluate 1, Flower's default; midgate's `aggregator` sets 0).

It ships inside the bench's Flower app (fl_bench.flower_default_app): the SuperLink runs without runtime dependency
installation and bench/ is not installed, but Flower's ServerApp process puts the installed app's directory on
sys.path before it imports the component, so it finds this module there.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from coordinator.federation.job import JobRunConfig
from coordinator.federation.server_app import run_job

app = ServerApp()


def flower_default_fedavg(job: JobRunConfig) -> FedAvg:
    """Flower's FedAvg with its default fractions (train and evaluate on every node the grid lists) and midgate's
    minimums (`aggregator`'s: the wrappers above list the round's nodes, never fewer than `min-nodes`)."""
    if job.dp_clipping_norm > 0 or job.server_momentum > 0:
        raise ValueError("the flower-default configuration measures plain FedAvg: no DP, no server momentum")
    return FedAvg(min_train_nodes=job.min_nodes, min_evaluate_nodes=job.min_nodes, min_available_nodes=job.min_nodes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_job(grid, context.run_id, JobRunConfig.from_run_config(context.run_config), flower_default_fedavg)
