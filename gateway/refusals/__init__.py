"""Why a request is refused and how that answer looks: the reason table and the JSON bodies SDKs
read.
"""
