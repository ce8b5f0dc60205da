"""The central admin's side: a Flower ServerApp that aggregates, evaluates, checkpoints and exports."""
