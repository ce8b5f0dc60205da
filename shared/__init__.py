"""Code used by both the fedpriv server and the department clients."""
