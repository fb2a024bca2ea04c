"""The stages of the request path, one per module, each a function on plain values;
gateway.pipeline runs them in order.
"""
