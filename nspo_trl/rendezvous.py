"""A free ``MASTER_PORT`` for command-line runs that no launcher started.

accelerate sets up ``torch.distributed`` even for one process on a machine without a GPU (DeepSpeed's
CPU accelerator), and then binds ``MASTER_PORT``, 29500 unless set. Two runs on one machine (two recipes,
a run beside the tests) would then collide: ``DistNetworkError ... port: 29500 ... EADDRINUSE``. A
process without ``WORLD_SIZE`` (not started by ``accelerate launch``/``torchrun``) therefore takes a free
port through TRL's ``ensure_master_addr_port``; a port set by a launcher or by the user is kept.
"""

from __future__ import annotations

import os


def free_master_port() -> None:
    """Set ``MASTER_ADDR``/``MASTER_PORT`` to localhost and a free port unless a launcher or the user set them."""
    if "WORLD_SIZE" in os.environ:
        return
    from trl.trainer.utils import ensure_master_addr_port

    ensure_master_addr_port()
