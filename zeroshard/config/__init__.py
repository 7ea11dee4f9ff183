"""The run configuration: DeepSpeed's JSON keys, validated and resolved.

- schema.py: `ZeroConfig` (pydantic), `load_config`, and what each key means at run time;
- sections.py: the sections (`zero_optimization`, `optimizer`, `scheduler`, `bf16`, ...);
- errors.py: `ConfigError`, one message naming the key path, the value and what is allowed;
- honoured.py: DeepSpeed keys zeroshard cannot honour as DeepSpeed defines them, refused by
  name; "no offload" spellings accepted;
- zeropp.py: the ZeRO++ keys' rules (stage 3 only, the node topology) and `ZeroPPConfig`.
"""

from zeroshard.config.errors import ConfigError
from zeroshard.config.schema import ZeroConfig, load_config

__all__ = ["ConfigError", "ZeroConfig", "load_config"]
