"""`make bench`: the gateway against bare nginx and HAProxy's jwt_verify, one table per run.

Run it with `python -m tests.bench.run` (see run.py). Nothing here is collected by pytest.
"""
