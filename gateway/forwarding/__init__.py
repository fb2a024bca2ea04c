"""Sending a checked request to the tracking API and relaying its answer: the headers each way, the
upstream pool, and the mapping of transport failures to reasons.
"""
