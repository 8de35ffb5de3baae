"""Microbenchmarks: `pytest benchmarks --benchmark-only` (add `--benchmark-json FILE` to keep them).

Benchmark files are named bench_*.py so that `pytest tests` never picks them up; this hook
collects them when pytest walks this folder. bench_step.py is a plain script with its own
table (`python benchmarks/bench_step.py`), not a pytest module.
"""
import pytest

collect_ignore = ["bench_step.py"]


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
