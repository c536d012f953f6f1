"""Serving: one node's endpoint (``disco-fl serve``) and the caller's session (``infer``)."""

from disco_fl.runtime.serving.client import InferenceError, InferenceSession
from disco_fl.runtime.serving.node_server import BusyError, NodeServer, ServeConfig

__all__ = ["BusyError", "InferenceError", "InferenceSession", "NodeServer", "ServeConfig"]
