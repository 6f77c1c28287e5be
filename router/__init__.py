"""Router: align extractor maps to one grid and width, weigh them per task with a gate, fuse, predict."""

if __name__ == "router":  # the old import name (deprecated): the same module as backbone_router.router
    from backbone_router._compat import alias_old_name

    alias_old_name(__name__)

from .config import ExtractorConfig, GateConfig, HeadConfig, RouterConfig, TaskConfig
from .model import Router
from .outputs import RouterOutput

__all__ = ["ExtractorConfig", "GateConfig", "HeadConfig", "Router", "RouterConfig", "RouterOutput", "TaskConfig"]
