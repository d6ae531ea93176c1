"""Interpreter settings for the server's processes, applied once their start-up is done.

Two things kept health slow while 64 callers sent 4 MiB bodies (issue #19, figures in
docs/reliability.md): the cyclic garbage collector's full passes walked the ~320k objects that
importing torch, grpc and the tokenizer leaves behind (~200 ms each, every thread stopped), and
the event loop waited up to the default 5 ms switch interval for the GIL after every `epoll`
while the planning threads decoded bodies.
"""

from __future__ import annotations

import gc
import sys

# The longest a thread running Python code keeps the GIL while another waits for it: the event
# loop takes the GIL several times per request, so this bounds the wait for each of those
# hand-offs (the planning threads lose a little throughput to the extra switches).
LOOP_SWITCH_INTERVAL_S = 0.0005


def freeze_start_up_objects() -> int:
    """Move every object alive now out of the collector's reach (`gc.freeze`, as vLLM does after
    loading): full passes then walk only what requests allocate. Returns how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def tune_front_process() -> int:
    """For the process whose event loop answers health and RPCs, once it serves: frozen start-up
    objects and a short switch interval. Returns the number of frozen objects (logged)."""
    sys.setswitchinterval(LOOP_SWITCH_INTERVAL_S)
    return freeze_start_up_objects()
