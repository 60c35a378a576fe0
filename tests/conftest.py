"""Session-wide fixtures: a private checkpoint cache and one shared pipeline run.

One vLLM engine serves every pipeline run of the session (the engine
registry, engine.registry, keys engines by settings and keeps them for
the session), so tests add runs, not engine start-ups.
"""
from __future__ import annotations

import os
import pathlib
import shutil

import pytest

from tests.gcs_emulator import gcs  # noqa: F401 - session fixture: a real local GCS server

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"

# Small output budgets: tests check structure and accounting, not the random model's text.
SMALL_OUTPUTS = ["--max_tokens", "ocr=24", "--max_tokens", "caption=12", "--max_tokens", "detect=48"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast", action="store_true",
        help="the fast tier: every test that needs no vLLM engine (tests marked `engine` are deselected)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--fast"):
        return
    engine = [item for item in items if item.get_closest_marker("engine") is not None]
    config.hook.pytest_deselected(items=engine)
    items[:] = [item for item in items if item not in engine]


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked `engine` that starts the engine in this process fails, naming the fix.

    In both tiers, so a test missing its mark fails in the full run too, not only where --fast drops the others.
    """
    if request.node.get_closest_marker("engine") is not None:
        return
    from engine import local as engine

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{request.node.nodeid} started the vLLM engine without the engine mark (the fast tier runs it): mark it @pytest.mark.engine")

    monkeypatch.setattr(engine.VisionEngine, "__init__", refuse)


@pytest.fixture(scope="session", autouse=True)
def _engines_kept_for_the_session() -> None:
    """Runs minutes apart reuse their engine, and no idle one is closed under the others.

    Unlike a job's worker, the session keeps engines of several settings side by
    side in one process, and in-process vLLM engines are shut down only together
    (engine.local._InProcessCores): closing idle ones would free nothing and cost
    a start-up at the next run of their settings.
    """
    from engine.registry import ENGINES

    ENGINES.idle_s = None


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Build the tiny checkpoint into a fresh cache, as on a new machine."""
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["VISION_BATCH_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_checkpoint(private_model_cache: pathlib.Path) -> pathlib.Path:
    from tiny_model.checkpoint import DEFAULT_PRESET, ensure_checkpoint

    return ensure_checkpoint(DEFAULT_PRESET)


def copy_samples(target: pathlib.Path) -> list[pathlib.Path]:
    target.mkdir(parents=True, exist_ok=True)
    return [pathlib.Path(shutil.copy(path, target)) for path in sorted(SAMPLES.iterdir())]


def run_pipeline(*args: str) -> dict:
    """Run the job in-process (sharing the session's engine) with small output budgets."""
    from pipelines import vision_batch

    return vision_batch.run([*args, *SMALL_OUTPUTS])
