"""Runs an entry point as ``python -m MODULE`` would, with the synthetic Fashion-MNIST checksums of the calling test.

    TEST_PAYLOAD_SHA256='{...}' python tests/entry.py magnets.evaluate HYDRA_ARGS...

The fixtures patch ``fashion_mnist.PAYLOAD_SHA256`` in the test's process
only; a subprocess (a Hydra multirun, a launcher) gets them through the
environment here.
"""

import json
import os
import runpy
import sys

from magnets.data import fashion_mnist

fashion_mnist.PAYLOAD_SHA256 = json.loads(os.environ["TEST_PAYLOAD_SHA256"])
module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
