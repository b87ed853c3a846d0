"""One module per fuzz target; each defines ``one_input(data: bytes)``.

``TARGETS`` is the order ``make fuzz`` runs them in.
"""

TARGETS = ("protocol", "handler", "virtqueue", "block", "inflight", "policy", "config", "control")
