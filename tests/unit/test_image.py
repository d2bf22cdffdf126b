"""What the container image promises (docs/dispatch.md): nothing in it reaches the Hugging
Face Hub or reports telemetry, whatever library asks."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def test_the_image_keeps_the_hub_offline_and_telemetry_off() -> None:
    final = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]  # the runtime stage
    env = final[final.index("ENV PATH="):].split("\nWORKDIR")[0]
    assert "HF_HUB_OFFLINE=1" in env and "HF_HUB_DISABLE_TELEMETRY=1" in env
