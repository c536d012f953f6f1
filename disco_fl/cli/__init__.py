"""The ``disco-fl`` command line (``main``), the one-command demo (``demo``) and a local Flower
deployment as processes (``deployment``)."""
