"""Flower client side of DISCO: the edge ``ClientApp`` (``clients.client_app:app``)."""
