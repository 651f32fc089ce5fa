"""The toy world's trained assets ship with the repo (toyworld/assets): a checkout without them is broken, and
every toy test fails with this message instead of skipping (a skip would turn a broken checkout green)."""

import pytest

import toyworld as toy


@pytest.fixture(scope="session", autouse=True)
def shipped_toy_assets():
    if not toy.assets_built():
        pytest.fail(
            f"HyperAlign: the toy world's assets are missing from {toy.MODEL_DIR.parent}. They are part of the "
            "repository: restore them (git checkout -- toyworld/assets) or rebuild them "
            "(python -m toyworld.factory.build)."
        )
