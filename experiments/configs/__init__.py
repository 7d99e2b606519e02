"""Named experiment configs (see :mod:`experiments.named_configs`): one module per config,
each with ``get_config() -> {flag name: value}``."""
