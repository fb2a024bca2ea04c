"""HTTP/1.1 on both sides, knowing nothing of the product: the public listener and its connections,
the request and response they carry, the upstream client and its pool, batched writes, listening
sockets.
"""
