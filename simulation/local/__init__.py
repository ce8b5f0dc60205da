"""Local federations on one machine: turn a data set into departments, embed their records, run and resume `fedpriv simulate`."""
