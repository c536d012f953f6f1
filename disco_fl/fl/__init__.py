"""DISCO on Flower: the model spec and record packing (``federated``), the typed round
config (``round_config``), the edge ``ClientApp`` (``client_app``, served as
``disco_fl.fl.client_app:app``) and the server side (``server``: :class:`DiscoStrategy` and
the ``ServerApp``)."""
