"""Reading what a request claims and checking it: the target, the body and its strict JSON,
identity and token extraction, keys, algorithms, JWKS, token verification.
"""
