"""modules/call_queue.py: queue_lock (Forge L10, a FIFOLock; A1111 a threading.Lock) and
wrap_queued_call (L13-20): generation and other model work run one at a time under the lock."""

import threading

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            res = func(*args, **kwargs)

        return res

    return f
