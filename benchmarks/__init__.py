"""Benchmarks of the minigpt library on this machine (`make bench` → reports/bench.json).

Not part of the installed package: they measure it. Run them from the repository root,
`python -m benchmarks.bench`, where the working directory is on `sys.path`.
"""
