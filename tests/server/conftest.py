import pytest


@pytest.fixture(scope="session")
def serve_ckpt(tmp_path_factory):
    """A random tiny checkpoint with the real o200k_harmony vocabulary (the server renders harmony)."""
    from servertools import MODEL

    from gptoss_jax.checkpoint.synthetic import write_checkpoint
    from gptoss_jax.config import Config

    return write_checkpoint(
        tmp_path_factory.mktemp("serve") / MODEL, Config.tiny(), layout="hf", shards=1, seed=3
    )
