"""`make soak`: a real `gateway run` under a steady, mixed, hostile load; is memory flat, do file
descriptors stay put, is every answer the one the contract promises? Run `python -m
tests.soak.run`; see `tests/soak/run.py` for the settings and the criteria.

Nothing here is named `test_*.py`: pytest never collects the soak.
"""
