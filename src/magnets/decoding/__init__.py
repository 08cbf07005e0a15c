"""Decoding: schedules, the parallel decode loop, the key/value cache, FLOP accounting, the static plan and fast path.

- ``schedules``: which width runs each of the K steps (``conf/schedule/``).
- ``loop``: :func:`decode`, a pure function over a tokens-to-logits callable.
- ``cache``: the eager tokens-to-logits callables, uncached and with a key/value cache.
- ``plan``: every step's width, kind and shapes, known before the first step.
- ``fast``: the planned tokens-to-logits callable (static buffers; CUDA graphs on a GPU).
- ``flops``: analytic FLOPs of a forward pass, a decode and a nested training step.
"""
