"""backbone_router: specialist vision extractors, a task-conditioned router and shared heads.

The one import name of the package (issue 27). Its subpackages are the repository's folders: backbone_router.extractors
(extractors/, with .extractors.io), .heads (heads/), .router (router/), .train (train/, with .train.training,
.train.experiments, .train.selfsup, .train.tools); this file is router/_package/__init__.py
(pyproject's [tool.setuptools.package-dir]).
"""

from backbone_router.extractors import (
    Extractor,
    ExtractorOutput,
    create_extractor,
    list_extractors,
    register_extractor,
)
from backbone_router.router import (
    ExtractorConfig,
    GateConfig,
    HeadConfig,
    Router,
    RouterConfig,
    RouterOutput,
    TaskConfig,
)

__version__ = "0.1.0"  # the package's version (pyproject reads it: [tool.setuptools.dynamic])

__all__ = [
    "Extractor",
    "ExtractorConfig",
    "ExtractorOutput",
    "GateConfig",
    "HeadConfig",
    "Router",
    "RouterConfig",
    "RouterOutput",
    "TaskConfig",
    "__version__",
    "create_extractor",
    "list_extractors",
    "register_extractor",
]
