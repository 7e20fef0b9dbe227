"""Reading checkpoints: released safetensors (both layouts), key tables, converted Orbax checkpoints.

- `untrusted.py`: the boundary every read goes through: regular files only, paths kept inside the folder,
  bounded JSON, one-line `CheckpointError`s with control characters escaped.
- `safetensors.py`: a strict safetensors reader (memory-mapped, one-line errors) and writer.
- `keys.py`: released tensor names (Hugging Face or `original/`) -> our per-layer storage names, with transforms.
- `source.py`: opening a released folder: layout detection, config, tensor -> file map.
- `orbax.py`: the converted checkpoint's format (metadata, names) and its reading side.
- `integrity.py`: crc32c checksums of converted arrays, and `verify_checkpoint`.
- `synthetic.py`: random checkpoints written in the exact released layouts (tests, demo, benchmarks).

The converter (`conversion/`) writes with these; the library never imports the converter.
"""

from .untrusted import CheckpointError

__all__ = ["CheckpointError"]
