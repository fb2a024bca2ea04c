"""Building blocks that know nothing of HTTP or of the product: the clock, bounded memos,
background tasks, digests.
"""
