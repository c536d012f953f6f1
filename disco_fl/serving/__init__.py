"""Serving: one node's endpoint (``disco-fl serve``) and the caller's session (``infer``)."""

from disco_fl.serving.client import InferenceError, InferenceSession
from disco_fl.serving.node_server import BusyError, NodeServer, ServeConfig

__all__ = ["BusyError", "InferenceError", "InferenceSession", "NodeServer", "ServeConfig"]
