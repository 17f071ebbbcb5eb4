"""`python-math-v0`: math word problems solved with the sandboxed `python` tool over several turns."""
