"""One node over the network: inference (``inference``), the peer transport (``transport``),
serving (``serving``), joint training (``training``) and the device probe (``probe``)."""
