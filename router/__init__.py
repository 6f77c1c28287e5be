"""Router: align extractor maps to one grid and width, weigh them per task with a gate, fuse, predict."""

from .config import ExtractorConfig, GateConfig, HeadConfig, RouterConfig, TaskConfig
from .model import Router
from .outputs import RouterOutput

__all__ = ["ExtractorConfig", "GateConfig", "HeadConfig", "Router", "RouterConfig", "RouterOutput", "TaskConfig"]
