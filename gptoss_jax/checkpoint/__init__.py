"""Reading checkpoints: released safetensors (both layouts), key tables, converted Orbax checkpoints.

- `safetensors.py`: a strict safetensors reader (memory-mapped, one-line errors) and writer.
- `keys.py`: released tensor names (Hugging Face or `original/`) -> our per-layer storage names, with transforms.
- `source.py`: opening a released folder: layout detection, config, tensor -> file map.
- `orbax.py`: the converted checkpoint's format (metadata, names) and its reading side.
- `synthetic.py`: random checkpoints written in the exact released layouts (tests, demo, benchmarks).

The converter (`conversion/`) writes with these; the library never imports the converter.
"""

from .safetensors import CheckpointError

__all__ = ["CheckpointError"]
