"""The command line and what it starts besides the gateway: the demo, the sample tracking API,
token inspection.
"""
