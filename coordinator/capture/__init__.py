"""Round captures: each node's update as Flower delivered it, kept for attribution and for the contribution gate."""
