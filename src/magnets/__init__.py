"""MaGNeTS: masked generative nested transformers with decode-time scaling (see docs/design.md).

Importing the package registers the ``${pid:}`` config resolver: run folders
are named by start time and process id, so two runs of one experiment
started in the same second never share a folder.
"""

import os

from omegaconf import OmegaConf

if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", os.getpid)
