"""Local federations on one machine (Flower's simulation engine) and the ``fedpriv`` command line."""
