"""Flower acceleration, the device's side: the pieces that shorten a round by working around Flower 1.42 internals,
each from outside (Flower is neither patched nor copied).

- `warm_executor`: Flower's device processes (SuperNode, SuperExec, ClientApps) forked from a parent that already
  imported torch, instead of a fresh `flwr-clientapp` importing torch for every message (about 4 s each);
- `message_wait`: a forked ClientApp waits until the SuperNode's log lines show its message pulled, instead of
  meeting Flower's 1 s object-pull back-off;
- `device.SUPEREXEC_ENV`: the SuperExec looks for a task every 0.2 s instead of 1 s;
- `packed_arrays`: the ClientApp mod that unpacks a message the MID packed and packs its reply (always in the
  ClientApp, since the MID decides whether a job packs).

One agent setting turns the first three off: `flower_acceleration` in agent.toml (default true); the SuperNode then
runs as Flower ships it (`--isolation subprocess`). `device.accelerated` applies them to a SuperNodeProcess.
docs/federated.md ("Flower acceleration") lists what each relies on and what a Flower upgrade needs; the
coordinator's side is coordinator.federation.acceleration.
"""
