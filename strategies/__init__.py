"""Aggregation rules for fedepic: pure functions/callables over stacked model vectors.

Peer-side (decentralized) rules take ``(own [D], neighbours [m, D], weights [m+1] | None)`` and
return the node's new model; the registry ``fedepic.extensions.PEER_RULES`` builds them by name from a config.
Flower wrappers (the only modules here that import flwr) live in their own files.
"""
