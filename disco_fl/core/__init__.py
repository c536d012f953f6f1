"""The leaves every layer reads: channel ownership (``layout``), codecs, hard-concrete gates,
the plan and its hash, atomic checksummed files, and tensors / control messages on the wire
(``wire``)."""
