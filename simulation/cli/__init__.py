"""The `fedpriv` command line: the Typer app (`main`), shared options, terminal output, and the admin, predict and serve commands."""
