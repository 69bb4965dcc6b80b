"""A session's workspace and its artifacts: a request's input files written in before the
agent starts, the files it created or changed kept at the end, both reached by directory
descriptor beneath the workspace, never following a symlink. Their rows are
`store/artifacts.py`."""
