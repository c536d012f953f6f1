"""The availability ping: what the node and the server share.

With degraded training the server asks, at the start of a train round, whether a node it has not
heard from lately is there (:mod:`disco_fl.fl.server.availability`): a ``query.ping`` message
(:data:`PING_TYPE`), which the ClientApp answers at once with an empty reply (:func:`ping`; no
data is loaded, no peer endpoint started). A node whose SuperNode is gone never answers it.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, RecordDict

PING_ACTION = "ping"
PING_TYPE = f"{MessageType.QUERY}.{PING_ACTION}"


def ping(msg: Message, context: Context) -> Message:
    """The node's answer to an availability ping: an empty reply."""
    del context
    return Message(RecordDict(), reply_to=msg)


__all__ = ["PING_ACTION", "PING_TYPE", "ping"]
