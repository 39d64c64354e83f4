"""Federated training on the MID's Flower SuperLink: job start, the ServerApp and its strategy, the fleet front."""
