"""An in-process stand-in for Flower's Grid: every pushed message goes through the server-based
ClientApp's handler at once, in this process, with one Flower ``Context`` per node.

Written here because Flower offers no in-process Grid for a ServerApp body: the benchmark of Flower's
overhead and the resume tests run the real ServerApp code (`server_app.serve`) over it, so what they
measure and check is that code without Ray and without message transport.
"""

from __future__ import annotations

import uuid
from typing import Iterable, Optional, Sequence

from flwr.app import Context, Message, MessageType, RecordDict

from simulations.client_app import handle_train, handle_warmup


class LocalGrid:
    """Nodes ``node_ids`` (or 1000, 1001, ... for ``num_nodes``) holding partitions 0, 1, ..."""

    def __init__(self, num_nodes: Optional[int] = None, node_ids: Optional[Sequence[int]] = None) -> None:
        ids = list(node_ids) if node_ids is not None else [1000 + i for i in range(int(num_nodes or 0))]
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": len(ids)},
                                       state=RecordDict(), run_config={}) for i, node in enumerate(ids)}
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # a real grid assigns it on push
            handler = handle_warmup if msg.metadata.message_type == MessageType.QUERY else handle_train
            self.replies[msg.metadata.message_id] = handler(msg, self.contexts[msg.metadata.dst_node_id])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
