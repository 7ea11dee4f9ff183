"""Integrations with the frameworks users train with (each an optional extra; the core never
imports this package): `hf_config` (framework-free "auto" resolution), `transformers`,
`lightning`, `deepspeed` (a `deepspeed.initialize` look-alike)."""
