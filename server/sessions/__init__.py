"""Sessions: admission, the run, the caller loop, the workspace, and reading them back.

`manager.py` is what `api/` calls; its docstring maps the sub-packages.
"""
