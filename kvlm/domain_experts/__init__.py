"""Domain experts: what one domain's author trains against a frozen released base and
publishes, and the base with any number of them installed, with no host training step.

Not to be confused with `kvlm.experts`, the plugin contract for expert *layers* that a
`SparseMoE` is built from. Here:

- `base`: the released base (`Base`) and its fingerprint;
- `expert`: a trained `DomainExpert` and its folder format (adapter or FFN expert);
- `specialist`: the model an expert trains in (`kvlm train --task domain_expert`);
- `adapters`: LoRA adapters through the base, trained, saved and run per example;
- `routing`: the router keys, question keys and abstention thresholds an author fits on their own data;
- `install`: the base with experts installed (`install_experts`);
- `multi_adapter`: the layer that runs many adapter experts on one frozen base;
- `report`: per-domain accuracy and routing of an installed model (`kvlm experts install`);
- `packaging`: the plugin distribution a trained expert is published as;
- `assembly`, `layers`: the model surgery and the layers they share.
"""

from kvlm.lazy import lazy_getattr

_LAZY = {
    "Base": "kvlm.domain_experts.base",
    "fingerprint": "kvlm.domain_experts.base",
    "DomainExpert": "kvlm.domain_experts.expert",
    "InstalledModel": "kvlm.domain_experts.install",
    "install_experts": "kvlm.domain_experts.install",
    "installed_experts": "kvlm.domain_experts.install",
    "specialist_model": "kvlm.domain_experts.specialist",
    "adapter_specialist_model": "kvlm.domain_experts.specialist",
    "AdapterExperts": "kvlm.domain_experts.multi_adapter",
    "router_keys": "kvlm.domain_experts.routing",
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_getattr(__name__, _LAZY)
