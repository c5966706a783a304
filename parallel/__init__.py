"""parallel3d: data, tensor and pipeline parallelism over one 3D mesh, with ZeRO and offload."""
from parallel.comm import CommStats, Group
from parallel.mesh import Mesh, init_distributed

__all__ = ["CommStats", "Group", "Mesh", "init_distributed"]
__version__ = "0.1.0"
