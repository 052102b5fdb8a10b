"""Aggregation rules for fedepic: pure functions/callables over stacked model vectors.

Peer-side (decentralized) rules take ``(own [D], neighbours [m, D], weights [m+1] | None)`` and
return the node's new model; build them by name with ``strategies.peer_rules.build_peer_rule``.
Flower wrappers (the only modules here that import flwr) live in their own files.
"""
