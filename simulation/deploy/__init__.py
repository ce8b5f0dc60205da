"""Flower's processes and deployment: provisioning kits, the SuperLink and SuperNodes, `flwr run`, `fedpriv status`, gathering the departments' audits."""
