"""Decoding: schedules, the parallel decode loop, the key/value cache, FLOP accounting, the static plan and fast path.

- ``schedules``: which width runs each of the K steps (``conf/schedule/``).
- ``loop``: :func:`~magnets.decoding.loop.decode`, a pure function over a tokens-to-logits callable.
- ``plan``: what each step does (``StepWork``, the cache modes) and the static plan of a whole decode.
- ``cache``: the key/value cache and the tokens-to-logits callables: uncached, cached, and planned (the fast path).
- ``graphs``: a planned step's forward captured into a CUDA graph and replayed.
- ``flops``: analytic FLOPs of a forward pass, a decode and a nested training step.
"""
