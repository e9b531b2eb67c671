"""A trained expert as a pip-installable plugin distribution (`write_plugin`).

The distribution `kvlm-<name>-expert` holds the module `kvlm_<name>_expert`, whose hook
registers one `ExpertSpec` with `trained` pointing at the expert folder shipped as package
data, a README and a test running `kvlm.testing.check_plugin`. Writing it needs no Keras.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

EXPERT_FILES = ("expert.json", "expert.weights.npz")


def distribution_name(name: str) -> str:
    """The pip name of the plugin of the expert `name`."""
    return f"kvlm-{name.replace('_', '-')}-expert"


def module_name(name: str) -> str:
    """The import name of the plugin of the expert `name`."""
    return f"kvlm_{name.replace('-', '_')}_expert"


def write_plugin(expert_dir: str | Path, output: str | Path, version: str = "0.1.0", base: str = "kvlm_tiny_vqa") -> Path:
    """Writes the plugin distribution of the trained expert in `expert_dir` to `output`.

    Args:
        expert_dir: A folder written by `DomainExpert.save`.
        output: The distribution folder to (re)create.
        version: The distribution's and the expert's version.
        base: The base preset the expert was trained against (named in the README and the test).

    Returns:
        `output`.

    Raises:
        FileNotFoundError: `expert_dir` is not a trained expert folder.
    """
    expert_dir, output = Path(expert_dir), Path(output)
    missing = [f for f in EXPERT_FILES if not (expert_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{expert_dir} is not a trained expert folder: no {', '.join(missing)}.")
    meta = json.loads((expert_dir / "expert.json").read_text(encoding="utf-8"))
    name, domain = meta["name"], meta["domain"]
    dist, module = distribution_name(name), module_name(name)
    if output.exists():
        shutil.rmtree(output)
    package = output / module
    package.mkdir(parents=True)
    shutil.copytree(expert_dir, package / "expert")  # with an adapter expert's expert.lora.h5
    accuracy = meta.get("metrics", {}).get("accuracy")
    description = f"{domain} expert for the kvlm base {meta['base']}" + (
        f" (specialist held-out accuracy {accuracy:.3f})" if accuracy is not None else ""
    )
    files = {
        output / "pyproject.toml": _PYPROJECT.format(dist=dist, module=module, name=name, version=version,
                                                     description=description),
        output / "README.md": _README.format(dist=dist, name=name, domain=domain, base=base, description=description,
                                             words=len(meta["words"]), answers=len(meta["answers"])),
        package / "__init__.py": _MODULE.format(dist=dist, name=name, domain=domain, version=version,
                                                description=description, vocabulary=tuple(meta["words"])),
        output / "tests" / f"test_{module}.py": _TEST.format(dist=dist, module=module, name=name, base=base),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return output


_PYPROJECT = """[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "{description}"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["kvlm>=0.1"]

[project.entry-points.kvlm]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}", "{module}.expert"]

[tool.setuptools.package-data]
"{module}.expert" = ["*"]
"""

_README = """# {dist}

{description}.

A trained kvlm domain expert: {words} new words, {answers} new answers, and router keys.
Install it and build the base with every installed expert; no training step runs:

```bash
pip install .
python -c "from kvlm.domain_experts import Base, install_experts; \\
print(install_experts(Base.load('{base}'), 'installed').experts)"
```

`kvlm experts list` shows `{name}` ({domain}); `pytest tests` checks the plugin with
`kvlm.testing.check_plugin`.
"""

_MODULE = '''"""{dist}: {description}."""

from __future__ import annotations

from pathlib import Path

import kvlm

__version__ = "{version}"


@kvlm.hookimpl
def kvlm_register_experts():
    return [
        kvlm.ExpertSpec(
            name="{name}",
            domain="{domain}",
            build="kvlm.experts.builtin:FFNExpert",
            version=__version__,
            description="{description}",
            vocabulary={vocabulary!r},
            trained=str(Path(__file__).parent / "expert"),
        )
    ]
'''

_TEST = '''"""{dist}: conformance, discovery and installation into its base."""

import kvlm.testing
import {module}


def test_plugin_conformance_and_discovery(tmp_path):
    found = kvlm.testing.check_plugin({module}, tmp_path=tmp_path, distribution="{dist}")
    assert [s.name for s in found["experts"]] == ["{name}"]


def test_installs_into_its_base():
    from kvlm.domain_experts import Base, install_experts

    installed = install_experts(Base.load("{base}"), ["{name}"])
    assert installed.experts == ["{name}"]
'''
