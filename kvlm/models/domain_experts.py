"""Deprecated: moved to `kvlm.domain_experts`.

Kept because the plugin distributions that earlier versions of the domain_expert task wrote
import `Base`, `install_experts` and `installed_experts` from here in their tests.
"""

import warnings

from kvlm.domain_experts.base import Base
from kvlm.domain_experts.expert import DomainExpert as TrainedExpert
from kvlm.domain_experts.install import install_experts, installed_experts

warnings.warn("kvlm.models.domain_experts moved to kvlm.domain_experts", DeprecationWarning, stacklevel=2)

__all__ = ["Base", "TrainedExpert", "install_experts", "installed_experts"]
