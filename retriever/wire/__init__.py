"""The wire between tiers: the protocol, its ZeroMQ transport, and CURVE keys.

Both ends use it: the retrieval node that serves SEARCH and the coordinator and clients above it,
so it lives at the bottom of the house, beside the node it serves.
"""
