"""Process plumbing both services run, with no domain in it (not the contract: that is `protocol`).

- `fork_server`: a warm parent that imports heavy modules once and forks a child per launcher request, so a program
  started by name (Flower's `flwr-clientapp` on a device, `flwr-serverapp` on the MID) skips its imports. The device's
  warm executor (edge.federated.acceleration.warm_executor) and the MID's warm ServerApp
  (coordinator.federation.warm_serverapp) are its two users.
- `processes.kill_pids`: SIGTERM, a grace period, SIGKILL; how the services stop what they started.
"""
