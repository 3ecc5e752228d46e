"""The sealed formats (spec: docs/format.md): envelope, sealed safetensors, sealed bundle, directories."""
