"""The engine's loop thread asks the kernel for a higher CPU priority than the rest of the node.

On a node whose cores the engine shares with the data plane (ingress, tokenizer,
detokenizer, Redis, Ray's own processes), every runnable thread gets an equal slice under
Linux's fair scheduler, so the engine's step waits behind text that could just as well wait.
With the engine ahead, the data plane runs on what is left and its readers find several
tokens per stream on each read: its cost per token falls as the load rises, instead of the
engine's speed.

Raising a priority (a negative nice value) needs CAP_SYS_NICE (root has it; in Kubernetes
the container must add the capability). Without it the thread keeps its priority and the
replica says so once in its log; nothing else changes.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)


def apply_thread_nice(nice: int) -> bool:
    """Set the calling thread's nice value (Linux: per thread). Returns whether it took; a
    refusal is logged."""
    if nice == 0 or not hasattr(os, "setpriority"):
        return nice == 0
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except PermissionError:
        logger.warning(
            "the engine loop keeps its CPU priority: raising it needs CAP_SYS_NICE", extra={"nice": nice}
        )
        return False
    return True
