"""An in-process stand-in for Flower's Grid, and with it `engine: local` of the server-based mode: the
same ServerApp code (`server_app.serve`) over every client in this process, with no Ray and no
SuperLink.

`LocalGrid` implements the part of the Grid that the ServerApp uses (``get_node_ids``,
``push_messages``, ``pull_messages``). A pushed message is answered at once: through the ClientApp
(Flower's own ``ClientApp.__call__`` dispatches it by message type, with the node's own ``Context``),
or, for a round's train messages, through a batch handler that answers them together
(``client_app.handle_train_batch``: one vectorized gradient call under the per-step protocol). A
client that raises answers with an error Message, as a Ray node does, so the failure accounting is
the same. Flower's strategies, samplers and records are used unchanged; only the transport is
replaced. Written here because Flower offers no in-process Grid for a ServerApp body outside its
simulation engine.

Flower builds every Message with the identity of the task that runs in the process
(``flwr.supercore.task_identity.TaskIdentity``: run, node and task ids), which its simulation engine
sets for a ServerApp's process. ``server_identity`` does the same for the duration of a local run
and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
import uuid
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
SERVER_NODE_ID = 0
CLIENT_APP_RAISED = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION

BatchHandler = Callable[[Sequence[Message], Sequence[Context]], list[Message]]


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """This process is the ServerApp of run RUN_ID while the block runs (module docstring)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SERVER_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class LocalGrid:
    """Nodes ``node_ids`` (or 1000, 1001, ... for ``num_nodes``) holding partitions 0, 1, ...

    Parameters
    ----------
    num_nodes, node_ids : int, sequence of int
        The clients, by count or by node id (tests use ids unlike a previous run's).
    client_app : flwr.clientapp.ClientApp, optional
        The app every message goes through; None: fedepic's server-based ClientApp.
    batch_train : callable, optional
        ``(messages, contexts) -> replies`` for a round's train messages at once; None sends each
        train message through ``client_app``. The default app's own batch handler is used when both
        are None.
    """

    def __init__(self, num_nodes: Optional[int] = None, node_ids: Optional[Sequence[int]] = None,
                 client_app: Any = None, batch_train: Optional[BatchHandler] = None) -> None:
        if client_app is None:
            from simulations.client_app import app, handle_train_batch

            client_app, batch_train = app, batch_train or handle_train_batch
        self.client_app, self.batch_train = client_app, batch_train
        ids = list(node_ids) if node_ids is not None else [1000 + i for i in range(int(num_nodes or 0))]
        self.contexts = {node: Context(run_id=RUN_ID, node_id=node,
                                       node_config={"partition-id": i, "num-partitions": len(ids)},
                                       state=RecordDict(), run_config={}) for i, node in enumerate(ids)}
        self.replies: dict[str, Message] = {}
        self.batch_calls = 0  # batched train calls made, and how many of them failed (then: one by one)
        self.batch_failed = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # a real grid assigns it on push
        trains = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if self.batch_train is not None and trains:
            self._answer_batch(trains)
        for msg in messages:
            if msg.metadata.message_id not in self.replies:
                self.replies[msg.metadata.message_id] = self._answer(msg)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _answer(self, msg: Message) -> Message:
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception:  # noqa: BLE001 - a client's failure is its error reply, as on Ray
            return Message(Error(CLIENT_APP_RAISED, traceback.format_exc()), reply_to=msg)

    def _answer_batch(self, messages: list[Message]) -> None:
        contexts = [self.contexts[m.metadata.dst_node_id] for m in messages]
        self.batch_calls += 1
        try:
            replies = self.batch_train(messages, contexts)  # type: ignore[misc]
        except Exception as err:  # noqa: BLE001 - a failure in the batch: every client then answers alone
            if not self.batch_failed:
                logging.getLogger("fedepic").warning(
                    "the batched train call failed (%s); the clients of this round and of later failing ones "
                    "answer one by one", err)
            self.batch_failed += 1
            return
        for msg, reply in zip(messages, replies):
            self.replies[msg.metadata.message_id] = reply
